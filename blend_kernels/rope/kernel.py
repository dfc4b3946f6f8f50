"""Triton re-rotation: one read and one (possibly strided, possibly in-place) write of every key.

Grid: (token blocks, leading x kv_heads). A program owns both halves of BLOCK_T key rows, so an
in-place call (out is keys) reads every element before it writes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import next_pow2, require_launchable
from .torch_impl import rope_tables

MAX_GRID_Y = 65535


@triton.jit
def _rerotate_kernel(
    X, Y, COS, SIN,
    num_heads, num_tokens,
    sxa, sxh, sxt, sxd,
    sya, syh, syt, syd,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_ah = tl.program_id(1)
    # int64 bases: a [layers, kv_heads, Nmax, head_dim] cache can pass 2**31 elements.
    a = (pid_ah // num_heads).to(tl.int64)
    h = (pid_ah % num_heads).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_HALF)
    mask = (offs_t < num_tokens)[:, None] & (offs_c < HALF)[None, :]
    rows = offs_t.to(tl.int64)[:, None]

    x_ptrs = X + a * sxa + h * sxh + rows * sxt + offs_c[None, :] * sxd
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
    table = offs_t[:, None] * HALF + offs_c[None, :]
    cos = tl.load(COS + table, mask=mask, other=1.0)
    sin = tl.load(SIN + table, mask=mask, other=0.0)

    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    y_ptrs = Y + a * sya + h * syh + rows * syt + offs_c[None, :] * syd
    tl.store(y_ptrs, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + HALF * syd, y2.to(Y.dtype.element_ty), mask=mask)


def _as_4d(t: torch.Tensor) -> torch.Tensor | None:
    """[..., kv_heads, tokens, head_dim] -> a [leading, kv_heads, tokens, head_dim] view, or None."""
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 4:
        return t
    try:
        return t.view(-1, *t.shape[-3:])
    except RuntimeError:
        return None


def rerotate_keys_triton(
    keys: torch.Tensor,
    deltas: torch.Tensor,
    inv_freq: torch.Tensor,
    out: torch.Tensor,
    *,
    block_t: int | None = None,
) -> torch.Tensor:
    """keys, out: [..., kv_heads, tokens, head_dim] (any strides; out may be keys);
    deltas: int [tokens]; inv_freq: [head_dim // 2]. Writes out and returns it."""
    require_launchable(_rerotate_kernel, keys=keys, out=out)
    if keys.numel() == 0:
        return out
    x = _as_4d(keys)
    if x is None:
        x = keys.reshape(-1, *keys.shape[-3:])
    y = _as_4d(out)
    if y is None:
        # Leading dims of out that no view can merge: rotate into a scratch buffer, then copy.
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        rerotate_keys_triton(keys, deltas, inv_freq, tmp, block_t=block_t)
        return out.copy_(tmp)

    leading, heads, tokens, head_dim = x.shape
    half = head_dim // 2
    if leading * heads > MAX_GRID_Y:
        raise ValueError(
            f"keys {list(keys.shape)} has {leading * heads} (leading x kv_heads) slabs; the Triton grid "
            f"allows {MAX_GRID_Y}: split the call along the leading dims"
        )
    cos, sin = rope_tables(deltas, inv_freq)
    block_half = next_pow2(half)
    # ~4K elements per half-tile: enough bytes in flight per program, few registers per thread.
    block_t = block_t or max(1, min(next_pow2(tokens), 4096 // block_half))
    grid = (triton.cdiv(tokens, block_t), leading * heads)
    _rerotate_kernel[grid](
        x, y, cos, sin,
        heads, tokens,
        *x.stride(), *y.stride(),
        HALF=half, BLOCK_T=block_t, BLOCK_HALF=block_half,
        num_warps=4,
    )
    return out
