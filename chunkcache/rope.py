"""Which RoPE variants chunkcache can re-rotate, and the load-time self-test that proves it.

Cached keys are stored after RoPE at the positions they were computed at and rotated by the
position delta when reused (blend_kernels.rerotate_keys). That is exact only when the rotation
angle is linear in the position with no extra scale on cos/sin: default, linear and llama3 RoPE.
Dynamic NTK changes its frequencies with the sequence length and YaRN/longrope scale cos/sin, so
a rotation by the delta would not equal computing at the target position: refuse them.
"""
from __future__ import annotations

import torch

COMPOSABLE_ROPE_TYPES = ("default", "linear", "llama3")
SELF_TEST_TOLERANCE = 1e-4


class UnsupportedRopeError(RuntimeError):
    pass


def rope_type_of(hf_config) -> str:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return params.get("rope_type") or params.get("type") or "default"


def check_rope_supported(hf_config) -> None:
    rope_type = rope_type_of(hf_config)
    if rope_type not in COMPOSABLE_ROPE_TYPES:
        raise UnsupportedRopeError(
            f"RoPE type {rope_type!r} does not compose (rotating cached keys by a position delta would not "
            f"equal computing them at the new position), so cached chunks cannot be reused with this model. "
            f"Supported RoPE types: {', '.join(COMPOSABLE_ROPE_TYPES)}.")
    partial = getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0
    if partial != 1.0:
        raise UnsupportedRopeError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, tokens, head_dim]; cos, sin: [tokens, head_dim] (HF rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_cos_sin(rotary_emb, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [tokens, head_dim] from the model's own rotary module, at `positions` [tokens]."""
    probe = torch.empty(0, dtype=dtype, device=positions.device)
    cos, sin = rotary_emb(probe, positions[None, :])
    return cos[0], sin[0]


def rope_self_test(rotary_emb, inv_freq: torch.Tensor, hf_config, *, seed: int = 0) -> float:
    """Keys rotated from positions a to b must equal keys computed at b, with the model's own RoPE.

    Runs at every model load (a few microseconds of work); returns the max abs error.
    LMCache's users met "garbled output" when a model's RoPE differed from what the cache assumed.
    """
    from blend_kernels import rerotate_keys

    head_dim = inv_freq.shape[0] * 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, head_dim, generator=gen).to(inv_freq.device)
    max_pos = int(getattr(hf_config, "max_position_embeddings", 2048))
    worst = 0.0
    for a, b in ((0, 7), (5, 1), (3, max(0, max_pos - 16))):
        pos_a = torch.arange(a, a + 8, device=inv_freq.device)
        pos_b = torch.arange(b, b + 8, device=inv_freq.device)
        ka = apply_rope(x, *rope_cos_sin(rotary_emb, pos_a, torch.float32))
        kb = apply_rope(x, *rope_cos_sin(rotary_emb, pos_b, torch.float32))
        moved = rerotate_keys(ka, pos_b - pos_a, inv_freq)
        worst = max(worst, (moved - kb).abs().max().item())
    if worst > SELF_TEST_TOLERANCE * max(1.0, x.abs().max().item()):
        raise UnsupportedRopeError(
            f"RoPE self-test failed: keys re-rotated to new positions differ from keys computed there by "
            f"{worst:.3g} (rope type {rope_type_of(hf_config)!r}); this model's RoPE cannot be reused from cache.")
    return worst
