"""Pick the tokens to recompute: every `always` token plus the top-scoring others."""

from __future__ import annotations

import torch


def select_tokens_torch(scores: torch.Tensor, num_select: int, always: torch.Tensor | None) -> torch.Tensor:
    """scores: fp32 [tokens]; always: bool [tokens] or None -> int64 [n] sorted unique indices.

    A stable descending sort breaks ties toward the lower index, which torch.topk does not promise.
    """
    tokens = scores.shape[0]
    if always is None:
        candidates = torch.arange(tokens, device=scores.device)
        forced = candidates[:0]
    else:
        candidates = torch.nonzero(~always).squeeze(1)
        forced = torch.nonzero(always).squeeze(1)
    k = min(num_select, candidates.numel())
    order = torch.sort(scores[candidates], descending=True, stable=True).indices[:k]
    picked = torch.cat((forced, candidates[order]))
    return torch.sort(picked).values
