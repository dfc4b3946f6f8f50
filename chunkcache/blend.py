"""What each mode recomputes: the prompt layout, the tokens run from layer 0, and the selector.

Pure functions over positions and scores; `forward.forward_tokens` runs what they decide.
  full   every token from scratch (the baseline; nothing is read from the store)
  reuse  cached prefix and chunks re-rotated into place; only the suffix is computed
  epic   the suffix plus the first `epic_tokens` of every chunk after the first (EPIC)
  blend  every token after the first chunk through the check layer, then the top `ratio` of
         chunk tokens by score plus the whole suffix (CacheBlend, DESIGN.md section 4)

The first chunk sits right after the prefix it was computed after, so its cached KV is already
what full prefill gives (to the store's dtype): blend neither recomputes nor selects it, and the
whole budget goes to the chunks that lost their context. Under a request's own system prompt the
prefix differs from the one every chunk was computed after, so no chunk is exact
(`first_chunk_exact` False) and the first chunk is a candidate like the others.

Every mode that reuses chunks can also scale the attention paid to the chunks that lost their
context (`chunk_key_bias`): each was encoded as if it opened the document, so later tokens give it
too much attention mass (APE). A per-layer, per-head factor S (fitted offline, see
chunkcache/calibration.py) multiplies those rows' attention weights before renormalising.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blend_kernels import select_tokens, token_deviation

from .forward import LayerProbe, Selector


@dataclass(frozen=True)
class PromptLayout:
    """Where everything sits in one prompt: [prefix][chunk 1]...[chunk k][suffix]."""

    prefix_len: int
    chunk_lens: tuple[int, ...]
    suffix_len: int
    first_chunk_exact: bool = True  # the prefix is the one the chunks were computed after

    @property
    def first_recomputed_chunk(self) -> int:
        """Index of the first chunk whose cached KV lost its context (the candidates start there)."""
        return 1 if self.first_chunk_exact else 0

    @property
    def chunk_starts(self) -> list[int]:
        starts, pos = [], self.prefix_len
        for n in self.chunk_lens:
            starts.append(pos)
            pos += n
        return starts

    @property
    def suffix_start(self) -> int:
        return self.prefix_len + sum(self.chunk_lens)

    @property
    def num_tokens(self) -> int:
        return self.suffix_start + self.suffix_len

    @property
    def num_chunk_tokens(self) -> int:
        return sum(self.chunk_lens)


def initial_positions(mode: str, layout: PromptLayout, epic_tokens: int = 16) -> torch.Tensor:
    """Positions computed from layer 0 (int64, increasing)."""
    if mode == "full":
        return torch.arange(layout.num_tokens)
    suffix = torch.arange(layout.suffix_start, layout.num_tokens)
    if mode == "reuse":
        return suffix
    first = layout.first_recomputed_chunk
    if mode == "blend":
        return torch.arange(layout.chunk_starts[first] if len(layout.chunk_lens) > first else layout.suffix_start,
                            layout.num_tokens)
    if mode == "epic":
        heads = [torch.arange(s, s + min(epic_tokens, n))
                 for s, n in zip(layout.chunk_starts[first:], layout.chunk_lens[first:])]
        return torch.cat(heads + [suffix])
    raise ValueError(f"unknown mode {mode!r}")


def stale_chunk_span(layout: PromptLayout) -> tuple[int, int]:
    """[start, end) positions of the chunks that lost their context: every chunk after the first."""
    start = layout.chunk_starts[1] if len(layout.chunk_lens) > 1 else layout.suffix_start
    return start, layout.suffix_start


def chunk_key_bias(layout: PromptLayout, log_scale: torch.Tensor | None, capacity: int, *,
                   own: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor:
    """The attention correction for one prompt: log(S) on the stale chunks' rows, 0 elsewhere.

    log_scale: fp32 [layers, 1 or q_heads] (None: S = 1) -> fp32 [layers, 1 or q_heads, capacity], the
    `KVCache.key_bias` layout. `own`: chunk index -> that stale chunk's own log(S) instead (None: S = 1), as
    for a context-enriched chunk (chunkcache/context.py), which lost less of its context than the others.
    `forward_tokens` clears a row's bias in every layer where it computes that row afresh, so recomputed
    tokens (blend's first layers, its selected tokens, and everything at ratio 1.0) are attended plainly.
    """
    own = own or {}
    scales = [log_scale] + [v for v in own.values() if v is not None]
    if all(v is None for v in scales):
        raise ValueError("chunk_key_bias: no scale to apply; leave the cache's bias unset instead")
    layers = next(v for v in scales if v is not None).shape[0]
    heads = max(v.shape[1] for v in scales if v is not None)
    device = next(v for v in scales if v is not None).device
    bias = torch.zeros(layers, heads, capacity, dtype=torch.float32, device=device)
    start, end = stale_chunk_span(layout)
    if log_scale is not None:
        bias[:, :, start:end] = log_scale[:, :, None].float()
    for index, value in own.items():
        if index < 1 or index >= len(layout.chunk_lens):
            raise ValueError(f"chunk_key_bias: chunk {index} is not a stale chunk (1 to {len(layout.chunk_lens) - 1})")
        begin = layout.chunk_starts[index]
        bias[:, :, begin:begin + layout.chunk_lens[index]] = 0.0 if value is None else value[:, :, None].float()
    return bias


def num_to_select(layout: PromptLayout, ratio: float) -> int:
    return int(round(ratio * layout.num_chunk_tokens))


def prior_positions(layout: PromptLayout, ratio: float, prior: torch.Tensor) -> torch.Tensor:
    """The "probe" selection, decided before layer 0: the top `ratio` of chunk tokens by the attention the
    question paid them over every layer of a reuse pass (`prior`: fp32 [>= prompt tokens], by position),
    then the suffix -> int64 positions, increasing.

    No check layer is needed: layer 0 sees only a token and its position, so the tokens left out keep a
    layer-0 KV that is already right, and the chosen ones are computed from layer 0 on.
    """
    candidates = initial_positions("blend", layout)
    is_suffix = candidates >= layout.suffix_start
    scores = prior.to(candidates.device)[candidates].float().masked_fill(is_suffix, 0.0)
    return candidates[select_tokens(scores, num_to_select(layout, ratio), always=is_suffix)]


def blend_selector(layout: PromptLayout, ratio: float, *, deviation: str = "value",
                   selection: str = "deviation", scores: torch.Tensor | None = None) -> Selector:
    """Selector for the check layer: top `ratio` of chunk tokens by score, plus every suffix token.

    selection: "deviation" (squared L2 between fresh and cached K or V, as CacheBlend),
    "query" (attention the question's tokens pay to each chunk token, as ProphetKV),
    "hybrid" (half the budget each, query first), or "impact" (attention mass times the L2
    deviation: a first-order bound on how much a token's stale KV moves the question's
    attention output, sum_j a_j * ||v_j - v'_j||). `scores` (fp32 [prompt tokens], by position)
    overrides `selection`: benchmark oracles pass what only full prefill knows. ("probe" selects
    before layer 0 instead: `prior_positions`.)
    """
    if selection == "probe" and scores is None:
        raise ValueError("selection 'probe' is decided before layer 0 (prior_positions), not at a check layer")
    budget = num_to_select(layout, ratio)

    def select(probe: LayerProbe) -> torch.Tensor:
        is_suffix = probe.positions >= layout.suffix_start
        if scores is not None:
            # Given per-position scores (the benchmark's oracles, which know full prefill's KV).
            given = scores.to(probe.positions.device)[probe.positions.clamp(max=len(scores) - 1)]
            return select_tokens(given.float().masked_fill(is_suffix, 0.0), budget, always=is_suffix)
        if selection == "deviation":
            return select_tokens(chunk_deviation(probe, deviation, is_suffix), budget, always=is_suffix)
        query = query_attention_scores(probe, is_suffix)
        if selection == "query":
            return select_tokens(query, budget, always=is_suffix)
        if selection == "impact":
            if probe.layer == 0:
                # Layer 0 sees only a token and its position: a reused token's fresh layer-0 KV equals
                # its cached one up to storage rounding (exactly, for float32 stores), so there is no
                # deviation to weigh; the value's norm bounds the token's share of the output instead.
                magnitude = probe.fresh_v.float().norm(dim=-1).sum(0).masked_fill(is_suffix, 0.0)
            else:
                magnitude = chunk_deviation(probe, deviation, is_suffix).sqrt()
            return select_tokens(query * magnitude, budget, always=is_suffix)
        if selection == "hybrid":
            first = select_tokens(query, budget // 2, always=is_suffix)
            taken = torch.zeros_like(is_suffix)
            taken[first] = True
            return select_tokens(chunk_deviation(probe, deviation, is_suffix), budget - budget // 2, always=taken)
        raise ValueError(f"unknown selection {selection!r}")

    return select


def chunk_deviation(probe: LayerProbe, which: str, is_suffix: torch.Tensor) -> torch.Tensor:
    """Deviation of the chunk tokens; 0 for the suffix, whose cache rows were never filled
    (uninitialized memory, possibly NaN) and which is always selected anyway."""
    return deviation_scores(probe, which).masked_fill(is_suffix, 0.0)


def deviation_scores(probe: LayerProbe, which: str) -> torch.Tensor:
    """fp32 [n]: how far each token's fresh K or V at the check layer is from its cached one."""
    if which == "key":
        return token_deviation(probe.fresh_k, probe.cached_k)
    if which == "value":
        return token_deviation(probe.fresh_v, probe.cached_v)
    raise ValueError(f"unknown deviation {which!r}; use key or value")


def query_attention_scores(probe: LayerProbe, is_suffix: torch.Tensor) -> torch.Tensor:
    """fp32 [n]: attention mass the suffix (question) queries put on each computed token, at the check layer.

    Keys are the fresh ones of this layer; the softmax runs over the prefix, the first chunk
    (cached and exact) and all computed tokens before the suffix, so scores compare across chunks.
    """
    q = probe.q[:, is_suffix].float()  # [q_heads, ns, D]
    keys = torch.cat((probe.cache.k[probe.layer][:, :int(probe.positions[0])], probe.fresh_k[:, ~is_suffix]), dim=1)
    group = q.shape[0] // keys.shape[0]
    keys = keys.float().repeat_interleave(group, dim=0)  # [q_heads, P + nc, D]
    weights = torch.softmax(q @ keys.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
    chunk_mass = weights[..., int(probe.positions[0]):].sum(dim=(0, 1))  # [nc]
    scores = torch.zeros(len(probe.positions), dtype=torch.float32, device=chunk_mass.device)
    scores[~is_suffix] = chunk_mass
    return scores
