"""One layer loop for every mode: full prefill, cached reuse, selective recompute and decoding.

All modes run through `forward_tokens`, so their timings and outputs compare like for like. It
calls the Hugging Face model's own decoder layers one at a time (chunkcache/layers.py), which is
what lets a subset of tokens continue past the check layer while the others keep their cached KV.
A layer writes its K/V and attends through `RowPass`: rows go to their positions in the request
cache, and each query sees exactly the rows at positions <= its own (within the layer's sliding
window), with the chunk-scale bias. That tensor work goes through `blend_kernels`. The decode steps of
requests whose caches are slots of one pool (the engine's) write and attend together, one call per
layer (`DecodeGroup`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from transformers import Cache

from blend_kernels import position_causal_attention, scatter_rows

from .kvcache import KVCache, decode_mask, pooled_decode_attention, views_of
from .layers import ROWS_KWARG
from .models import LoadedModel


@dataclass
class LayerProbe:
    """What a selector sees at the check layer, before the fresh KV overwrites the cached rows.

    fresh_*/cached_*: [kv_heads, n, head_dim] for the n tokens being computed; q: [q_heads, n, head_dim]
    (post-RoPE); positions: int64 [n].
    """

    layer: int
    positions: torch.Tensor
    q: torch.Tensor
    fresh_k: torch.Tensor
    fresh_v: torch.Tensor
    cached_k: torch.Tensor
    cached_v: torch.Tensor
    cache: KVCache


# A selector returns the local indices (into probe.positions, sorted) of the tokens to keep computing.
Selector = Callable[[LayerProbe], torch.Tensor]


@dataclass
class ForwardResult:
    logits: torch.Tensor | None  # [vocab] for the last token, or [n, vocab] with all_logits
    kept_positions: torch.Tensor  # positions computed through the last layer
    info: dict = field(default_factory=dict)


@torch.inference_mode()
def forward_tokens(lm: LoadedModel, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor, *,
                   narrow_at: int | None = None, selector: Selector | None = None,
                   all_logits: bool = False, attention_mass: bool = False) -> ForwardResult:
    """Compute `token_ids` at `positions` through every layer, writing their K/V into `cache`.

    Rows of `cache` at other positions must already hold valid K/V (cached or computed earlier);
    each query attends exactly to the keys at positions <= its own. With `narrow_at=c`, after
    layer c only the tokens `selector` keeps go on; the others keep their layer c+1.. K/V from the
    cache. With `attention_mass`, info["attention_mass"] is the attention these queries paid to
    each key position, summed over layers, heads and queries (fp32 [kv_len]; for a few queries).
    token_ids, positions: int64 [n], positions strictly increasing.
    """
    rows = RowPass([Segment(cache, positions, lm.device)], probe_layer=narrow_at if selector else None,
                   attention_mass=attention_mass)
    h, info = _run_layers(lm, rows, token_ids, selector)
    if attention_mass:
        info["attention_mass"] = rows.mass[0]
    last = h[0] if all_logits else h[0, -1:]
    logits = lm.parts.logits(last)
    return ForwardResult(logits if all_logits else logits[0], rows.segments[0].positions, info)


@torch.inference_mode()
def forward_batch(lm: LoadedModel, requests: list[tuple[KVCache, torch.Tensor, torch.Tensor]], *,
                  attention_mass: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Several requests' tokens in one flattened pass: each (cache, token_ids [n_i], positions [n_i]) as
    `forward_tokens` would compute it alone, with the projections and MLPs batched over all tokens and
    attention per request over its own cache (and its own chunk-scale bias).
    -> (fp32 [len(requests), vocab]: each request's last-token logits, and with `attention_mass` each
    request's attention mass as `forward_tokens` gives it, else None).
    """
    segments = [Segment(cache, positions, lm.device) for cache, _, positions in requests]
    rows = RowPass(segments, probe_layer=None, attention_mass=attention_mass)
    h, _ = _run_layers(lm, rows, torch.cat([ids for _, ids, _ in requests]), None)
    return lm.parts.logits(h[0, [s.rows.stop - 1 for s in rows.segments]]), rows.mass


def _run_layers(lm: LoadedModel, rows: RowPass, token_ids: torch.Tensor,
                selector: Selector | None) -> tuple[torch.Tensor, dict]:
    """Every decoder layer over the flattened tokens of `rows` -> (last hidden states [1, N, hidden], info)."""
    parts = lm.parts
    h = parts.embed(token_ids.to(lm.device))  # [1, N, hidden]
    positions = rows.all_positions()
    tables = parts.rotary_tables(positions, lm.dtype)
    info: dict = {}
    for index, layer in enumerate(parts.layers):
        h = layer(h, attention_mask=None, position_ids=positions[None], cache=rows,
                  position_embeddings=tables[parts.rope_keys[index]], **{ROWS_KWARG: rows})
        if index == rows.probe_layer:
            keep = selector(rows.probe)
            h = h[:, keep]
            tables = {key: (cos[:, keep], sin[:, keep]) for key, (cos, sin) in tables.items()}
            rows.narrow(keep)
            positions = rows.all_positions()
            info["selected"] = len(keep)
    for segment in rows.segments:
        segment.cache.length = max(segment.cache.length, segment.kv_len)
    return h, info


class Segment:
    """One request's tokens in a flattened batch: they write and attend only its cache."""

    rows: slice  # where its tokens sit in the batch (set by RowPass)

    def __init__(self, cache: KVCache, positions: torch.Tensor, device: torch.device):
        self.cache = cache
        self.set_positions(positions, device)

    def set_positions(self, positions: torch.Tensor, device: torch.device) -> None:
        """positions: int64 [n], strictly increasing, on any device (host reads are free on the CPU)."""
        self.kv_len = int(positions[-1].item()) + 1
        self.contiguous_from_zero = positions[0].item() == 0 and self.kv_len == len(positions)
        with torch.inference_mode(False):
            # A normal tensor (not an inference one) keeps a version counter, so blend_kernels proves
            # its range once per pass; without one it is checked again in every layer, a device sync
            # each on CUDA (60 per decode step measured on an H200: bench/results/gpu/).
            self.positions = positions.to(device, copy=True)


class RowPass(Cache):
    """One pass of the layers as transformers sees it: their cache and their attention.

    The batch is flattened: segment i's tokens are rows `segments[i].rows` of every layer's input,
    at their own positions in their own request cache. `update` writes a layer's new K/V rows at
    those positions (clearing their chunk-scale bias: a row computed in a layer is fresh there);
    `attend` runs each segment's attention over its cache's rows. At the probe layer (one segment)
    it keeps what a selector needs.
    """

    def __init__(self, segments: list[Segment], probe_layer: int | None, attention_mass: bool = False):
        super().__init__(layers=[])
        self.segments = segments
        self._lay_out()
        if probe_layer is not None and len(segments) != 1:
            raise ValueError("selective recompute narrows one request at a time")
        for s in segments:
            if s.kv_len > s.cache.capacity:
                raise ValueError(f"position {s.kv_len - 1} is past the end of a request cache of "
                                 f"{s.cache.capacity} rows")
        self.group = DecodeGroup.of(segments, segments[0].positions.device) if not attention_mass else None
        self.alone = [s for s in segments if self.group is None or s not in self.group.members]
        self.probe_layer = probe_layer
        self.probe: LayerProbe | None = None
        self.mass = [torch.zeros(s.kv_len, dtype=torch.float32, device=s.positions.device) for s in segments] \
            if attention_mass else None

    def _lay_out(self) -> None:
        """Segment i's tokens are rows [start_i, start_i + n_i) of the flattened batch, in order."""
        start = 0
        for segment in self.segments:
            segment.rows = slice(start, start + len(segment.positions))
            start = segment.rows.stop

    def all_positions(self) -> torch.Tensor:
        if len(self.segments) == 1:
            return self.segments[0].positions
        return torch.cat([s.positions for s in self.segments])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value_states: [1, kv_heads, N, D] for the tokens in flight. Returns the layer's rows of a lone
        request, [1, kv_heads, kv_len, D] (what transformers expects; `attend` reads the caches itself)."""
        if self.group is not None:
            self.group.write(layer_idx, key_states[0], value_states[0])
        for s in self.alone:
            kv, k, v = s.cache, key_states[0, :, s.rows], value_states[0, :, s.rows]
            if layer_idx == self.probe_layer:
                self.probe = LayerProbe(layer_idx, s.positions, None, k, v, kv.k[layer_idx][:, s.positions],
                                        kv.v[layer_idx][:, s.positions], kv)
            scatter_rows(kv.k[layer_idx], k, s.positions)
            scatter_rows(kv.v[layer_idx], v, s.positions)
            if kv.key_bias is not None:
                kv.key_bias[layer_idx].index_fill_(1, s.positions, 0.0)
        if len(self.segments) > 1:
            return key_states, value_states
        s = self.segments[0]
        return s.cache.k[layer_idx][None, :, :s.kv_len], s.cache.v[layer_idx][None, :, :s.kv_len]

    def attend(self, layer_idx: int, q: torch.Tensor, scale: float, window: int | None,
               softcap: float | None) -> torch.Tensor:
        """q: [1, q_heads, N, D] -> [1, N, q_heads, D]."""
        if layer_idx == self.probe_layer:
            self.probe.q = q[0]
        if self.mass is not None:
            for s, mass in zip(self.segments, self.mass):
                mass += attention_weights(s.cache, layer_idx, q[0, :, s.rows], s.positions, scale, s.kv_len,
                                          window, softcap).sum(dim=(0, 1))
        group = self.group if softcap is None else None  # (SDPA has no soft cap: each attends alone)
        alone = self.alone if group is not None else self.segments
        outs = [_attention(s.cache, layer_idx, q[0, :, s.rows], s.positions, scale, s.contiguous_from_zero,
                           s.kv_len, window, softcap) for s in alone]
        if group is None:
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            return out.transpose(0, 1)[None]
        grouped = group.attend(layer_idx, q[0], scale, window)
        if not alone and group.rows == slice(0, q.shape[2]):
            return grouped[None]  # a step of decodes only
        out = q.new_empty((q.shape[2], q.shape[1], q.shape[3]))  # [N, q_heads, D]
        out[group.rows] = grouped
        for s, o in zip(alone, outs):
            out[s.rows] = o.transpose(0, 1)
        return out[None]

    def narrow(self, keep: torch.Tensor) -> None:
        """After the probe layer only the `keep` tokens (local indices, sorted) of the lone segment go on."""
        segment = self.segments[0]
        segment.set_positions(segment.positions[keep], segment.positions.device)
        self._lay_out()

    # What transformers may ask a Cache outside update(); the request caches answer.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(s.cache.length for s in self.segments)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return max(s.kv_len for s in self.segments), 0


class DecodeGroup:
    """The step's one-token segments (decode steps) whose caches are slots of one `KVPool`: each layer writes
    their K/V with one index_put and attends them with one call (`kvcache.pooled_decode_attention`) instead of
    one of each per request. That call reads slots [first, first + span), each up to the longest member's row,
    so `of` leaves out a member whose padding would cost more than the calls it saves."""

    def __init__(self, members: list[Segment], device: torch.device):
        self.members = members
        self.pool = members[0].cache.pool
        slots = [s.cache.slot for s in members]
        self.first = min(slots)
        self.kv_len = max(s.kv_len for s in members)
        lengths = torch.ones(max(slots) - self.first + 1, dtype=torch.long)  # a slot without a query sees row 0
        lengths[torch.tensor(slots) - self.first] = torch.tensor([s.kv_len for s in members])
        self.lengths = lengths.to(device)
        self.slots = torch.tensor(slots, device=device)
        self.positions = torch.cat([s.positions for s in members])
        # The usual step (the engine puts decode rows first; slots are taken lowest first) is rows [r, r + B)
        # for slots [first, first + B), in order: slices then stand in for gathers and scatters.
        starts = [s.rows.start for s in members]
        in_order = starts == list(range(starts[0], starts[0] + len(members)))
        self.rows = slice(starts[0], starts[0] + len(members)) if in_order else torch.tensor(starts, device=device)
        dense = slots == list(range(self.first, self.first + len(slots)))
        self.local = None if dense else self.slots - self.first  # each member's place in the slot range
        self.with_bias = self.pool.bias is not None and any(s.cache.key_bias is not None for s in members)
        self._masks: dict[int | None, torch.Tensor] = {}

    @classmethod
    def of(cls, segments: list[Segment], device: torch.device) -> DecodeGroup | None:
        pool = next((s.cache.pool for s in segments if s.cache.pool is not None), None)
        members = [s for s in segments if len(s.positions) == 1 and s.cache.pool is pool is not None
                   and s.kv_len - 1 >= s.cache.prompt_rows  # a decode step, not a one-row prefill piece
                   and (s.cache.key_bias is None or s.kv_len - 1 >= s.cache.bias_from)
                   and (s.cache.key_bias is None or views_of(s.cache.key_bias, pool.bias))]
        while len(members) > 1:
            slots = [s.cache.slot for s in members]
            read = (max(slots) - min(slots) + 1) * max(s.kv_len for s in members)
            if read <= 2 * sum(s.kv_len for s in members):
                return cls(members, device)
            members.remove(max(members, key=lambda s: s.kv_len))
        return None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [kv_heads, N, D], the whole batch's new rows: the members' go to their slots and positions,
        and their chunk-scale bias there is cleared (a computed row is fresh)."""
        self.pool.k[layer][self.slots, :, self.positions] = k[:, self.rows].transpose(0, 1)
        self.pool.v[layer][self.slots, :, self.positions] = v[:, self.rows].transpose(0, 1)
        if self.pool.bias is not None:
            self.pool.bias[layer][self.slots, :, self.positions] = 0.0

    def attend(self, layer: int, q: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
        """q: [q_heads, N, D], the whole batch's queries -> the members' outputs [B, q_heads, D]."""
        if window not in self._masks:
            self._masks[window] = decode_mask(self.lengths, self.kv_len, window, q.dtype)
        span = slice(self.first, self.first + len(self.lengths))
        bias = self.pool.bias[layer, span, :, :self.kv_len] if self.with_bias else None
        return pooled_decode_attention(q[:, self.rows].transpose(0, 1), self.pool.k[layer, span, :, :self.kv_len],
                                       self.pool.v[layer, span, :, :self.kv_len], self._masks[window], bias,
                                       self.local, scale)


def _attention(cache: KVCache, index: int, q: torch.Tensor, positions: torch.Tensor, scale: float,
               contiguous_from_zero: bool, kv_len: int, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
    """q: [q_heads, n, D] at `positions` over layer `index` of the cache -> [q_heads, n, D]."""
    bias = cache.key_bias[index] if cache.key_bias is not None else None
    if bias is not None and kv_len - 1 < cache.bias_from:
        bias = None  # no query here takes the correction
    if window is not None and window >= kv_len:
        window = None  # a window wider than the prompt is plain causal attention
    if contiguous_from_zero and bias is None and window is None and softcap is None:
        # Plain causal prefill: no mask to build. The inputs must be 4-D: torch's CPU flash
        # kernel takes only [batch, heads, tokens, dim]; 3-D falls back to a math path ~9x slower.
        n = len(positions)
        return F.scaled_dot_product_attention(q[None], cache.k[index][None, :, :n], cache.v[index][None, :, :n],
                                              is_causal=True, scale=scale, enable_gqa=True)[0]
    if len(positions) == 1 and softcap is None:
        # One query (a decode step) sees every key in its window up to its own row: no causal mask.
        lo = 0 if window is None else kv_len - window
        mask = bias[None, :, None, lo:kv_len].to(q.dtype) if bias is not None else None
        return F.scaled_dot_product_attention(q[None], cache.k[index][None, :, lo:kv_len],
                                              cache.v[index][None, :, lo:kv_len], attn_mask=mask, scale=scale,
                                              enable_gqa=True)[0]
    return position_causal_attention(q, cache.k[index][:, :kv_len], cache.v[index][:, :kv_len], positions,
                                     scale=scale, key_bias=bias, bias_from=cache.bias_from, window=window,
                                     softcap=softcap)


def attention_weights(cache: KVCache, index: int, q: torch.Tensor, positions: torch.Tensor, scale: float,
                      kv_len: int, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The attention probabilities of a few queries over layer `index` of the cache, as `_attention`
    weighs them (mask, window, cap, chunk-scale bias): q [q_heads, n, D] -> fp32 [q_heads, n, kv_len]."""
    from blend_kernels.attention.reference import position_causal_weights

    bias = cache.key_bias[index][:, :kv_len] if cache.key_bias is not None else None
    return position_causal_weights(q, cache.k[index][:, :kv_len], positions, scale, bias, cache.bias_from, window,
                                   softcap)
