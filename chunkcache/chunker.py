"""Splitting documents into chunks of at most `chunk_tokens` LLM tokens.

Chunks break at paragraph boundaries where possible, then at sentence boundaries, and only
inside a sentence when a single sentence is longer than a chunk. Document text is untrusted: it is
counted and split as plain text (chunkcache/tokens.py), as `chunk_token_ids` will tokenize it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .tokens import encode_plain, plain_offsets

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offsets into the document text
    end: int


def split_chunks(text: str, tokenizer, chunk_tokens: int) -> list[Chunk]:
    """Greedy packing of paragraphs/sentences into chunks of at most `chunk_tokens` tokens."""
    pieces = [p for p in _pieces(text, tokenizer, chunk_tokens) if text[p[0]:p[1]].strip()]
    chunks: list[Chunk] = []
    start = end = None
    used = 0
    for p_start, p_end, p_tokens, p_paragraph_start in pieces:
        # A new paragraph prefers to open a new chunk once the current one is half full.
        fits = used + p_tokens <= chunk_tokens and not (p_paragraph_start and used >= chunk_tokens // 2)
        if start is not None and fits:
            end, used = p_end, used + p_tokens
            continue
        if start is not None:
            chunks.append(_chunk(text, start, end))
        start, end, used = p_start, p_end, p_tokens
    if start is not None:
        chunks.append(_chunk(text, start, end))
    return chunks


def _chunk(text: str, start: int, end: int) -> Chunk:
    raw = text[start:end]
    lead = len(raw) - len(raw.lstrip())
    body = raw.strip()
    return Chunk(body, start + lead, start + lead + len(body))


def _pieces(text: str, tokenizer, chunk_tokens: int):
    """Yields (start, end, num_tokens, starts_paragraph) spans no longer than chunk_tokens."""
    for p_start, p_end in _spans(text, _PARAGRAPH, 0, len(text)):
        first = True
        for s_start, s_end in _spans(text, _SENTENCE_END, p_start, p_end):
            n = _count(tokenizer, text[s_start:s_end])
            if n <= chunk_tokens:
                yield s_start, s_end, n, first
            else:
                for w_start, w_end, w_n in _split_long(text, s_start, s_end, tokenizer, chunk_tokens):
                    yield w_start, w_end, w_n, first
                    first = False
            first = False


def _spans(text: str, sep: re.Pattern, start: int, end: int):
    pos = start
    for m in sep.finditer(text, start, end):
        yield pos, m.start()
        pos = m.end()
    yield pos, end


def _split_long(text: str, start: int, end: int, tokenizer, chunk_tokens: int):
    """Split one over-long sentence at token boundaries (via offsets) into windows."""
    offsets = plain_offsets(tokenizer, text[start:end])
    for i in range(0, len(offsets), chunk_tokens):
        window = offsets[i:i + chunk_tokens]
        w_end = offsets[i + chunk_tokens][0] if i + chunk_tokens < len(offsets) else end - start
        yield start + window[0][0], start + w_end, len(window)


def _count(tokenizer, text: str) -> int:
    return len(encode_plain(tokenizer, text))
