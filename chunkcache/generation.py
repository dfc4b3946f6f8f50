"""One request's decoding state: it turns each step's logits into a token, text pieces and finally an Answer.

It never runs the model. Whoever drives it (`RAGPipeline` alone, or the engine's batched steps) computes
the logits of `next_input()` and hands them to `feed`, so a request decodes the same tokens alone or
batched with others.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from transformers import LogitsProcessorList

from .answer import Answer, CacheStats, Source, Timings
from .sampling import next_token, top_logprobs


class Generation:
    """Sampling, stop conditions and incremental detokenisation for one request."""

    def __init__(self, tokenizer, eos_token_ids, *, max_new_tokens: int, temperature: float, top_p: float,
                 logprobs: int, seed: int | None, prompt_ids: torch.Tensor, started: float, sources: list[Source],
                 timings: Timings, stats: CacheStats, config: dict,
                 processors: LogitsProcessorList | None = None, stop: tuple[str, ...] = (),
                 cancelled: Callable[[], bool] | None = None, step_logits: list[torch.Tensor] | None = None):
        self.tokenizer = tokenizer
        self.eos = eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.logprobs = temperature, top_p, logprobs
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.position = len(prompt_ids)  # where the last sampled token goes when it is fed back
        self.started = started
        self.sources, self.timings, self.stats, self.config = sources, timings, stats, config
        self.prompt_ids = prompt_ids  # what the processors see before the answer (penalties)
        self.processors = processors or LogitsProcessorList()
        self.stop = stop  # strings that end the answer; the text returned stops before them
        self.stopped_text: str | None = None  # the answer's text, cut before the stop string that ended it
        self.cancelled = cancelled
        self.step_logits = step_logits  # the benchmark's record of every step's distribution
        self.tokens: list[int] = []
        self.logprob_rows: list[dict] = []
        self.emitted = ""
        self.ttft: float | None = None
        self.finish_reason: str | None = None  # set once the request is done
        self.decode_started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, logits: torch.Tensor) -> list[str]:
        """The logits after the last input (fp32 [vocab]) -> the text pieces this token completes."""
        if self.cancelled is not None and self.cancelled():
            self.finish_reason = "cancelled"  # nobody waits for the rest: free the model for others
            return []
        if self.step_logits is not None:
            self.step_logits.append(logits)
        if self.processors:
            seen = torch.cat((self.prompt_ids, torch.tensor(self.tokens, dtype=torch.long)))
            logits = self.processors(seen[None].to(logits.device), logits[None].float())[0]
        token = next_token(logits, self.temperature, self.top_p, self.generator)
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started
        if self.logprobs:
            self.logprob_rows.append(top_logprobs(logits, token, self.logprobs, self.tokenizer.decode))
        if token in self.eos:
            self.finish_reason = "stop"
            return []
        self.tokens.append(token)
        if len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        ready = len(text)
        if self.stop:
            found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if found:
                self.finish_reason, self.stopped_text = "stop", text[:min(found)]
                text, ready = self.stopped_text, len(self.stopped_text)
            else:  # hold back a tail that may yet grow into a stop string
                ready -= max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        # Hold back a piece that ends inside a multi-byte character until it completes.
        if ready > len(self.emitted) and not text[:ready].endswith("\ufffd"):
            piece, self.emitted = text[len(self.emitted):ready], text[:ready]
            return [piece]
        return []

    def next_input(self) -> tuple[int, int]:
        """(token, position) to compute next: the last sampled token, at the row after the previous one."""
        return self.tokens[-1], self.position + len(self.tokens) - 1

    def cancel(self) -> None:
        if not self.done:
            self.finish_reason = "cancelled"

    def answer(self) -> tuple[list[str], Answer]:
        """The final text pieces not yet emitted (held back mid-character), and the Answer."""
        text = self.stopped_text if self.stopped_text is not None else \
            self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        rest = [text[len(self.emitted):]] if len(text) > len(self.emitted) else []
        self.timings.decode_s = time.perf_counter() - self.decode_started
        self.stats.completion_tokens = len(self.tokens)
        return rest, Answer(text=text.strip(), token_ids=list(self.tokens), sources=self.sources, ttft_s=self.ttft,
                            total_s=time.perf_counter() - self.started, timings=self.timings, stats=self.stats,
                            finish_reason=self.finish_reason or "length",
                            logprobs=self.logprob_rows if self.logprobs else None, config=self.config)
