"""Readable fp32 position-causal attention: explicit scores, mask, softmax, weighted sum.

Query i sits at position q_pos[i] and sees exactly keys 0..q_pos[i]; key j sits at position j.
This is not the bottom-right-aligned causal mask (query i of nq sees keys up to Nk - nq + i), which
lets early selected tokens see later keys.
"""

from __future__ import annotations

import torch


def position_causal_mask(q_pos: torch.Tensor, num_keys: int, window: int | None = None) -> torch.Tensor:
    """q_pos: int [nq] -> bool [nq, num_keys], True where query i may see key j: j <= q_pos[i] and,
    with a sliding window, q_pos[i] - j < window (Hugging Face's convention: `window` keys, self included)."""
    keys = torch.arange(num_keys, device=q_pos.device)
    visible = keys[None, :] <= q_pos[:, None]
    if window is not None:
        visible &= keys[None, :] > q_pos[:, None] - window
    return visible


def position_causal_weights(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float | None = None,
    key_bias: torch.Tensor | None = None, bias_from: int = 0, window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The attention probabilities: q [q_heads, nq, head_dim], k [kv_heads, Nk, head_dim] -> fp32 [q_heads, nq, Nk].

    GQA: query head h reads kv head h // (q_heads // kv_heads). key_bias: fp32 [1 or q_heads, Nk],
    added to the logits of every query at a position >= bias_from (a per-key log attention scale).
    window: sliding-window size (see position_causal_mask). softcap: logits -> softcap * tanh(logits /
    softcap) before the bias and the mask (Gemma 2).
    """
    q_heads, _, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    k = k.to(torch.float32).repeat_interleave(q_heads // k.shape[0], dim=0)
    scores = (q.to(torch.float32) @ k.transpose(1, 2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if key_bias is not None:
        applies = (q_pos >= bias_from).to(torch.float32)  # [nq]
        scores = scores + key_bias.to(torch.float32)[:, None, :] * applies[None, :, None]
    scores = scores.masked_fill(~position_causal_mask(q_pos, k.shape[1], window), float("-inf"))
    return torch.softmax(scores, dim=-1)


def position_causal_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float | None = None,
    key_bias: torch.Tensor | None = None, bias_from: int = 0, window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [q_heads, nq, head_dim]; k, v: [kv_heads, Nk, head_dim]; q_pos: int [nq] -> fp32 [q_heads, nq, head_dim].
    The probabilities of `position_causal_weights` times the values."""
    weights = position_causal_weights(q, k, q_pos, scale, key_bias, bias_from, window, softcap)
    return weights @ v.to(torch.float32).repeat_interleave(q.shape[0] // k.shape[0], dim=0)
