"""What a query returns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Source:
    text: str
    source: str
    score: float | None  # retrieval similarity; None for documents given by the caller
    key: str  # chunk key (hex) in the store
    hit: bool  # KV was read from the store (False: computed for this request)


@dataclass
class Timings:
    queue_s: float = 0.0  # waiting for the engine to admit the request (see chunkcache/engine.py)
    retrieve_s: float = 0.0
    load_s: float = 0.0  # reading chunk KVs, computing misses, re-rotating into place
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class CacheStats:
    mode: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was read from the store (not a miss) and not recomputed
    recomputed_tokens: int = 0  # prompt tokens computed through the last layer (suffix included)
    recompute_fraction: float = 0.0  # share of chunk tokens recomputed (the ratio actually used)
    chunk_hits: int = 0
    chunk_misses: int = 0
    dropped_chunks: int = 0  # lowest-ranked chunks left out to fit the context window
    damaged_chunks: int = 0  # stored KVs that failed their checksum: recomputed, rewritten, counted as misses
    unstored_chunks: int = 0  # missed `documents` computed for this request only (quota spent, or not persisted)
    context_chunks: int = 0  # chunks placed from their context-enriched entry (chunkcache/context.py)
    store_unavailable: bool = False  # the shared store (Redis) could not be reached: misses computed here
    completion_tokens: int = 0


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    sources: list[Source]
    ttft_s: float
    total_s: float
    timings: Timings
    stats: CacheStats
    finish_reason: str  # "stop" (EOS), "length", or "cancelled" (the caller stopped it, e.g. its client left)
    logprobs: list[dict] | None = None
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
