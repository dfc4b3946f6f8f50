"""One layer loop for every mode: full prefill, cached reuse, selective recompute and decoding.

All modes run through `forward_tokens`, so their timings and outputs compare like for like. It
drives the HF model's own modules (embeddings, norms, projections, MLP, rotary) layer by layer,
which is what lets a subset of tokens continue past the check layer while the others keep their
cached KV. Tensor work that differs from a plain forward (scatter into the request cache,
position-causal attention, deviation) goes through `blend_kernels`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from blend_kernels import position_causal_attention, scatter_rows

from .models import LoadedModel
from .rope import apply_rope, rope_cos_sin


@dataclass
class KVCache:
    """The per-request KV cache; row j holds the token at position j.

    k, v: [layers, kv_heads, capacity, head_dim] in the model's compute dtype.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    # Optional attention correction (chunkcache/blend.py, `chunk_key_bias`): fp32 [layers, 1 or
    # q_heads, capacity] added to the attention logits of every query at a position >= bias_from,
    # so log(S) on a reused chunk's stale rows scales their attention mass by S. A row computed
    # in a layer is fresh there, and its bias is cleared. None: plain attention.
    key_bias: torch.Tensor | None = None
    bias_from: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


def new_cache(lm: LoadedModel, capacity: int) -> KVCache:
    shape = (lm.num_layers, lm.num_kv_heads, capacity, lm.head_dim)
    # empty, not zeros: every row is written (copied from the store or computed) before it is read.
    return KVCache(torch.empty(shape, dtype=lm.dtype, device=lm.device),
                   torch.empty(shape, dtype=lm.dtype, device=lm.device))


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
                   all_logits: bool = False) -> ForwardResult:
    """Compute `token_ids` at `positions` through every layer, writing their K/V into `cache`.

    Rows of `cache` at other positions must already hold valid K/V (cached or computed earlier);
    each query attends exactly to the keys at positions <= its own. With `narrow_at=c`, after
    layer c only the tokens `selector` keeps go on; the others keep their layer c+1.. K/V from the
    cache. token_ids, positions: int64 [n], positions strictly increasing.
    """
    model = lm.hf_model.model
    rotary = model.rotary_emb
    positions = positions.to(lm.device)
    h = model.embed_tokens(token_ids.to(lm.device))
    cos, sin = rope_cos_sin(rotary, positions, lm.dtype)
    contiguous_from_zero = positions[0].item() == 0 and positions[-1].item() == len(positions) - 1
    info: dict = {}
    for index, layer in enumerate(model.layers):
        x = layer.input_layernorm(h)
        q, k, v = _project_qkv(layer.self_attn, x, cos, sin, lm)
        keep = None
        if index == narrow_at and selector is not None:
            probe = LayerProbe(index, positions, q, k, v, cache.k[index][:, positions], cache.v[index][:, positions],
                               cache)
            keep = selector(probe)
        scatter_rows(cache.k[index], k, positions)
        scatter_rows(cache.v[index], v, positions)
        if cache.key_bias is not None:
            cache.key_bias[index].index_fill_(1, positions, 0.0)  # a row computed here is no longer stale
        attn = _attention(cache, index, q, positions, layer.self_attn.scaling, contiguous_from_zero)
        h = h + layer.self_attn.o_proj(attn.transpose(0, 1).reshape(h.shape[0], -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if keep is not None:
            h, positions = h[keep], positions[keep]
            cos, sin = cos[keep], sin[keep]
            contiguous_from_zero = False
            info["selected"] = len(keep)
    cache.length = max(cache.length, int(positions[-1].item()) + 1)
    last = h if all_logits else h[-1:]
    logits = lm.hf_model.lm_head(model.norm(last)).float()
    return ForwardResult(logits if all_logits else logits[0], positions, info)


def _attention(cache: KVCache, index: int, q: torch.Tensor, positions: torch.Tensor, scale: float,
               contiguous_from_zero: bool) -> torch.Tensor:
    """q: [q_heads, n, D] at `positions` over layer `index` of the cache -> [q_heads, n, D]."""
    bias = cache.key_bias[index] if cache.key_bias is not None else None
    if bias is not None and int(positions[-1]) < cache.bias_from:
        bias = None  # no query here takes the correction
    if contiguous_from_zero and bias is None:
        # Plain causal prefill: no mask to build. The inputs must be 4-D: torch's CPU flash
        # kernel takes only [batch, heads, tokens, dim]; 3-D falls back to a math path ~9x slower.
        n = len(positions)
        return F.scaled_dot_product_attention(q[None], cache.k[index][None, :, :n], cache.v[index][None, :, :n],
                                              is_causal=True, scale=scale, enable_gqa=True)[0]
    if len(positions) == 1:
        # One query (a decode step) sees every key up to its own row: no causal mask at all.
        kv_len = int(positions[0].item()) + 1
        mask = bias[None, :, None, :kv_len].to(q.dtype) if bias is not None else None
        return F.scaled_dot_product_attention(q[None], cache.k[index][None, :, :kv_len],
                                              cache.v[index][None, :, :kv_len], attn_mask=mask, scale=scale,
                                              enable_gqa=True)[0]
    kv_len = int(positions[-1].item()) + 1
    return position_causal_attention(q, cache.k[index][:, :kv_len], cache.v[index][:, :kv_len], positions,
                                     scale=scale, key_bias=bias, bias_from=cache.bias_from)


def _project_qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lm: LoadedModel):
    """x: [n, hidden] -> q [q_heads, n, D], k [kv_heads, n, D] (both after RoPE), v [kv_heads, n, D]."""
    n = x.shape[0]
    q = attn.q_proj(x).view(n, lm.num_q_heads, lm.head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(n, lm.num_kv_heads, lm.head_dim).transpose(0, 1)
    v = attn.v_proj(x).view(n, lm.num_kv_heads, lm.head_dim).transpose(0, 1)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 normalizes q/k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
