"""Answers in OpenAI's chat completion shapes (`chat.completion` and `chat.completion.chunk`)."""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict

from ..answer import Answer


class Completion:
    """The fields every object of one completion shares (id, created, model)."""

    def __init__(self, model: str, fingerprint: str | None):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.system_fingerprint = f"fp_{fingerprint[:12]}" if fingerprint else None

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}

    def response(self, answer: Answer, top_logprobs: int | None) -> dict:
        """The whole `chat.completion`; `top_logprobs` None: no logprobs asked for."""
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                  "logprobs": logprobs(answer, top_logprobs), "finish_reason": answer.finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage(answer),
                "chunkcache": extras(answer)}

    def chunk(self, delta: dict, finish_reason: str | None = None, logprobs_: dict | None = None,
              include_usage: bool = False) -> dict:
        body = {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs_, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None  # OpenAI sends null on every chunk but the last when usage is asked for
        return body

    def usage_chunk(self, answer: Answer) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(answer),
                "chunkcache": extras(answer)}


def usage(answer: Answer) -> dict:
    s = answer.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def extras(answer: Answer) -> dict:
    """chunkcache's own report (sources, TTFT, timings, cache stats); OpenAI clients keep unknown fields."""
    return {"sources": [asdict(s) for s in answer.sources], "ttft_s": answer.ttft_s, "total_s": answer.total_s,
            "timings": asdict(answer.timings), "stats": asdict(answer.stats)}


def logprobs(answer: Answer, top: int | None) -> dict | None:
    """OpenAI's `{"content": [{token, logprob, bytes, top_logprobs}]}` for the generated tokens.

    The pipeline also scores the end-of-sequence token it stopped on; OpenAI leaves that out.
    """
    if top is None or answer.logprobs is None:
        return None
    rows = answer.logprobs[:len(answer.token_ids)]
    return {"content": [_entry(row, row["top_logprobs"][:top]) for row in rows], "refusal": None}


def _entry(row: dict, alternatives: list[dict]) -> dict:
    return {"token": row["token"], "logprob": row["logprob"], "bytes": list(row["token"].encode("utf-8")),
            "top_logprobs": [{"token": a["token"], "logprob": a["logprob"], "bytes": list(a["token"].encode("utf-8"))}
                             for a in alternatives]}
