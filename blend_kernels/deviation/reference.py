"""Readable fp32 per-token deviation between fresh and cached K (or V) rows."""

from __future__ import annotations

import torch


def token_deviation_reference(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """fresh, cached: [kv_heads, tokens, head_dim] -> fp32 [tokens]:
    sum over heads and head_dim of (fresh - cached)^2."""
    kv_heads, tokens, _ = fresh.shape
    total = torch.zeros(tokens, dtype=torch.float32, device=fresh.device)
    for h in range(kv_heads):
        diff = fresh[h].to(torch.float32) - cached[h].to(torch.float32)
        total += (diff * diff).sum(dim=-1)
    return total
