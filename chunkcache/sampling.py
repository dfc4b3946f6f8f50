"""Choosing the next token from logits: greedy, or temperature with nucleus (top-p) sampling."""
from __future__ import annotations

import torch

GREEDY_BELOW = 1e-4


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits: [vocab] fp32. temperature 0 (or below GREEDY_BELOW) means greedy."""
    if temperature < GREEDY_BELOW:
        # Dividing by a tiny temperature overflows to inf and breaks sampling; the limit is greedy.
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        outside[0] = False  # a top_p that rounds to 0 in fp32 must still keep the top token
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token: int, k: int, decode) -> dict:
    """OpenAI-style entry: the chosen token's log-probability and the k most likely alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, k)
    return {"token": decode(token), "token_id": token, "logprob": float(logp[token]),
            "top_logprobs": [{"token": decode(int(i)), "token_id": int(i), "logprob": float(v)}
                             for v, i in zip(values, ids)]}
