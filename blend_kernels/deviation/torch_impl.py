"""Torch path of `token_deviation`."""

from __future__ import annotations

import torch


def token_deviation_torch(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """fresh, cached: [kv_heads, tokens, head_dim] -> fp32 [tokens]."""
    diff = fresh.to(torch.float32) - cached.to(torch.float32)
    return diff.square_().sum(dim=(0, 2))
