"""Torch path of `scatter_rows`."""

from __future__ import annotations

import torch


def scatter_rows_torch(dst: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
    """dst: [kv_heads, N, head_dim] (any strides, written in place); rows: [kv_heads, n, head_dim]; index: int64 [n]."""
    dst.index_copy_(1, index, rows.to(dst.dtype))
