"""Triton per-token deviation: each program owns BLOCK_T tokens and walks every head and head_dim
block, so the sum needs no atomics and reads fresh and cached exactly once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import next_pow2, require_launchable


@triton.jit
def _deviation_kernel(
    F, C, OUT,
    num_heads, num_tokens, head_dim,
    sfh, sft, sfd,
    sch, sct, scd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_tokens
    rows = offs_t.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for h in range(num_heads):
        for d0 in range(0, head_dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = t_ok[:, None] & (offs_d < head_dim)[None, :]
            f = tl.load(F + h * sfh + rows * sft + offs_d[None, :] * sfd, mask=mask, other=0.0)
            c = tl.load(C + h * sch + rows * sct + offs_d[None, :] * scd, mask=mask, other=0.0)
            diff = f.to(tl.float32) - c.to(tl.float32)
            acc += diff * diff
    tl.store(OUT + offs_t, tl.sum(acc, axis=1), mask=t_ok)


def token_deviation_triton(
    fresh: torch.Tensor, cached: torch.Tensor, *, block_t: int | None = None
) -> torch.Tensor:
    """fresh, cached: [kv_heads, tokens, head_dim] (any strides) -> fp32 [tokens]."""
    require_launchable(_deviation_kernel, fresh=fresh, cached=cached)
    kv_heads, tokens, head_dim = fresh.shape
    out = torch.empty(tokens, dtype=torch.float32, device=fresh.device)
    if tokens == 0:
        return out
    block_d = min(next_pow2(head_dim), 128)
    block_t = block_t or max(1, min(next_pow2(tokens), 4096 // block_d))
    _deviation_kernel[(triton.cdiv(tokens, block_t),)](
        fresh, cached, out,
        kv_heads, tokens, head_dim,
        *fresh.stride(), *cached.stride(),
        BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4,
    )
    return out
