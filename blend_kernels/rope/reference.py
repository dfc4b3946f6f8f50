"""Readable fp32 RoPE in the HF Llama `rotate_half` convention, the yardstick for the fast paths.

RoPE at position p: x * cos(p * inv_freq) + rotate_half(x) * sin(p * inv_freq), with the head_dim
split into halves x1 = x[..., :D/2], x2 = x[..., D/2:] and rotate_half(x) = cat(-x2, x1); the D/2
angles are repeated twice (cat(freqs, freqs)). Rotations compose, R(a) R(b) = R(a + b), so keys
stored after RoPE at p move to p + d by rotating them by d.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] -> [..., head_dim]: cat(-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: int [tokens]; inv_freq: [head_dim // 2] -> cos, sin: fp32 [tokens, head_dim].

    The angle is formed in fp32 like HF's rotary embedding, so cached keys and re-rotated keys
    carry the same rounding.
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x: [..., tokens, head_dim] (before RoPE, or after it when positions are deltas);
    positions: int [tokens] -> fp32 [..., tokens, head_dim]."""
    cos, sin = rope_angles(positions.to(x.device), inv_freq.to(x.device))
    x = x.to(torch.float32)
    return x * cos + rotate_half(x) * sin


def rerotate_keys_reference(keys: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """keys: [..., kv_heads, tokens, head_dim] post-RoPE; deltas: int [tokens] -> fp32, same shape."""
    return apply_rope(keys, deltas, inv_freq)
