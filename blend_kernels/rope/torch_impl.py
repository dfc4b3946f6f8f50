"""Torch path of `rerotate_keys` (what CPU runs in production): fp32 math, one write into `out`."""

from __future__ import annotations

import torch


def rope_tables(deltas: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """deltas: int [tokens]; inv_freq: [head_dim // 2] -> cos, sin: fp32 [tokens, head_dim // 2].

    Computed once per call and shared by every layer and head (the Triton launcher uses it too, so
    both backends rotate by bit-identical angles; torch's cos/sin are accurate for large angles
    where a GPU's fast approximations are not).
    """
    freqs = deltas.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    return freqs.cos(), freqs.sin()


def _rotate_into(keys: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """keys, out: [kv_heads, tokens, head_dim]; cos, sin: fp32 [tokens, head_dim // 2]."""
    half = keys.shape[-1] // 2
    x1 = keys[..., :half].to(torch.float32)
    x2 = keys[..., half:].to(torch.float32)
    # Both halves are computed before either is written: out may alias keys (and x1/x2 are views
    # of keys when it is fp32).
    o1 = x1 * cos
    o1.addcmul_(x2, sin, value=-1.0)
    o2 = x2 * cos
    o2.addcmul_(x1, sin)
    out[..., :half].copy_(o1)
    out[..., half:].copy_(o2)


def rerotate_keys_torch(
    keys: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """keys, out: [..., kv_heads, tokens, head_dim]; deltas: int [tokens]; inv_freq: [head_dim // 2]."""
    cos, sin = rope_tables(deltas, inv_freq)
    if keys.dim() == 3:
        _rotate_into(keys, out, cos, sin)
        return out
    # One [kv_heads, tokens, head_dim] slab at a time keeps the fp32 temporaries cache-sized
    # instead of doubling the memory of a whole [layers, ...] stack.
    for k_slab, o_slab in zip(_slabs(keys), _slabs(out)):
        _rotate_into(k_slab, o_slab, cos, sin)
    return out


def _slabs(t: torch.Tensor):
    """Views [kv_heads, tokens, head_dim] of t: [..., kv_heads, tokens, head_dim] without copying."""
    if t.dim() == 3:
        yield t
        return
    for sub in t.unbind(0):
        yield from _slabs(sub)
