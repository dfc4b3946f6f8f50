"""Triton row scatter: reads rows once, casts, writes them straight into a strided cache view."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import next_pow2, require_launchable


@triton.jit
def _scatter_rows_kernel(
    DST, ROWS, INDEX,
    num_rows, head_dim,
    sdh, sdn, sdd,
    srh, srn, srd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1).to(tl.int64)
    r_ok = offs_r < num_rows
    target = tl.load(INDEX + offs_r, mask=r_ok, other=0).to(tl.int64)
    src_rows = offs_r.to(tl.int64)
    for d0 in range(0, head_dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (offs_d < head_dim)[None, :]
        x = tl.load(ROWS + h * srh + src_rows[:, None] * srn + offs_d[None, :] * srd, mask=mask)
        tl.store(DST + h * sdh + target[:, None] * sdn + offs_d[None, :] * sdd,
                 x.to(DST.dtype.element_ty), mask=mask)


def scatter_rows_triton(
    dst: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, *, block_r: int | None = None
) -> None:
    """dst: [kv_heads, N, head_dim] (any strides, written in place); rows: [kv_heads, n, head_dim];
    index: int64 [n], unique and in range (checked by the caller)."""
    require_launchable(_scatter_rows_kernel, dst=dst, rows=rows, index=index)
    kv_heads, num_rows, head_dim = rows.shape
    if num_rows == 0:
        return
    block_d = min(next_pow2(head_dim), 128)
    block_r = block_r or max(1, min(next_pow2(num_rows), 4096 // block_d))
    grid = (triton.cdiv(num_rows, block_r), kv_heads)
    _scatter_rows_kernel[grid](
        dst, rows, index,
        num_rows, head_dim,
        *dst.stride(), *rows.stride(),
        BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )
