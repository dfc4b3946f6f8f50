"""Answers in OpenAI's shapes: `chat.completion` (and its chunks), `text_completion`, embeddings."""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict

from ..answer import Answer


class Completion:
    """The fields every object of one completion shares (id, created, model)."""

    id_prefix = "chatcmpl-"

    def __init__(self, model: str, fingerprint: str | None):
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.system_fingerprint = f"fp_{fingerprint[:12]}" if fingerprint else None

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}

    def response(self, answers: list[Answer], top_logprobs: int | None) -> dict:
        """The whole `chat.completion`, one choice per answer; `top_logprobs` None: no logprobs asked for."""
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text, "refusal": None},
                    "logprobs": logprobs(a, top_logprobs), "finish_reason": a.finish_reason}
                   for i, a in enumerate(answers)]
        total = usage(answers[0])  # one prompt; every choice's tokens
        total["completion_tokens"] = sum(a.stats.completion_tokens for a in answers)
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        return {**self._head("chat.completion"), "choices": choices, "usage": total, "chunkcache": extras(answers[0])}

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


class TextCompletion(Completion):
    """`/v1/completions`: OpenAI's legacy `text_completion` objects."""

    id_prefix = "cmpl-"

    def response(self, answers: list[Answer], top_logprobs: int | None) -> dict:
        choices = [{"index": i, "text": a.text, "logprobs": legacy_logprobs(a, top_logprobs),
                    "finish_reason": a.finish_reason} for i, a in enumerate(answers)]
        total = usage(answers[0])
        total["completion_tokens"] = sum(a.stats.completion_tokens for a in answers)
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        return {**self._head("text_completion"), "choices": choices, "usage": total, "chunkcache": extras(answers[0])}

    def text_chunk(self, text: str, finish_reason: str | None = None, logprobs_: dict | None = None,
                   include_usage: bool = False) -> dict:
        body = {**self._head("text_completion"),
                "choices": [{"index": 0, "text": text, "logprobs": logprobs_, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, answer: Answer) -> dict:
        return {**self._head("text_completion"), "choices": [], "usage": usage(answer), "chunkcache": extras(answer)}


def legacy_logprobs(answer: Answer, top: int | None) -> dict | None:
    """The completions API's `{tokens, token_logprobs, top_logprobs, text_offset}`."""
    if not top or answer.logprobs is None:
        return None
    rows = answer.logprobs[:len(answer.token_ids)]
    offsets, at = [], 0
    for row in rows:
        offsets.append(at)
        at += len(row["token"])
    return {"tokens": [r["token"] for r in rows], "token_logprobs": [r["logprob"] for r in rows],
            "top_logprobs": [{a["token"]: a["logprob"] for a in r["top_logprobs"][:top]} for r in rows],
            "text_offset": offsets}


def embeddings(vectors, model: str, prompt_tokens: int, encoding_format: str) -> dict:
    """OpenAI's embeddings list; base64 is the float32 bytes, as OpenAI encodes them."""
    import base64

    import numpy as np

    def encode(v):
        return base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode() if encoding_format == "base64" \
            else [float(x) for x in v]

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


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
