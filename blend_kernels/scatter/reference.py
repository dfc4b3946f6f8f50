"""Readable row scatter: dst[:, index[i], :] = rows[:, i, :] one row at a time."""

from __future__ import annotations

import torch


def scatter_rows_reference(dst: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
    """dst: [kv_heads, N, head_dim]; rows: [kv_heads, n, head_dim]; index: int [n], unique."""
    for i, j in enumerate(index.tolist()):
        dst[:, j, :] = rows[:, i, :].to(dst.dtype)
