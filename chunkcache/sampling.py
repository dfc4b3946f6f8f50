"""Choosing the next token from logits: greedy, or temperature with nucleus (top-p) sampling, after the
request's logits processors (penalties, logit bias)."""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

GREEDY_BELOW = 1e-4


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits: [vocab] fp32. temperature 0 (or below GREEDY_BELOW) means greedy."""
    # Penalties can overflow a logit (a repetition penalty of 1e-200 divides by it): an infinite logit is
    # the largest finite one, a NaN never wins, and shifting by the maximum keeps the division below finite.
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if temperature < GREEDY_BELOW or not torch.isfinite(logits.max()):
        # Dividing by a tiny temperature overflows to inf and breaks sampling; the limit is greedy.
        return int(torch.argmax(logits))
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
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


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties, over the generated tokens only: each token's logit
    drops by frequency_penalty x its count so far, plus presence_penalty once it has appeared.
    (transformers has no processor for them; its repetition penalty is multiplicative and counts the prompt.)"""

    def __init__(self, frequency_penalty: float, presence_penalty: float, prompt_len: int):
        self.frequency, self.presence, self.prompt_len = frequency_penalty, presence_penalty, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def logits_processors(*, prompt_len: int, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                      presence_penalty: float = 0.0, logit_bias: dict[int, float] | None = None) -> LogitsProcessorList:
    """transformers' logits processors for a request's decoding options (an empty list when none is set)."""
    processors = LogitsProcessorList()
    if logit_bias:
        processors.append(SequenceBiasLogitsProcessor([[[token], float(bias)] for token, bias in logit_bias.items()]))
    if repetition_penalty != 1.0:  # transformers' (CTRL's): over the prompt and the answer, as vLLM does
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if frequency_penalty or presence_penalty:
        processors.append(OpenAIPenalties(frequency_penalty, presence_penalty, prompt_len))
    return processors
