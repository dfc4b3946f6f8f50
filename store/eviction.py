"""Which KV entries to drop when the store is over its size cap: pure functions over entry statistics.

Eviction drops a chunk's KV only; its text, metadata and embedding stay, so it is still retrieved and its
KV is recomputed on the next miss. Two classes of entry, evicted in this order:
  - request entries (KV computed for a request's `documents` or for a tenant's copy of a retrieved chunk):
    least recently used, weighted by how often they were used and by recompute cost per byte;
  - corpus entries (ingested: they have an embedding): only once no request entry is left, in an order
    blind to who used them (recompute cost per byte, then newest first), so eviction leaks nothing about
    any tenant's activity through recency.
The prompt-prefix entry is never evicted.
"""
from __future__ import annotations

from dataclasses import dataclass

# Attention makes recomputing a chunk grow faster than linearly in its length; a chunk of this many tokens
# costs about twice its linear (MLP/projection) part. A rough constant: it only orders entries.
QUADRATIC_TOKENS = 2048


@dataclass(frozen=True)
class EntryStats:
    key: bytes
    chunk_id: int
    num_bytes: int  # KV payload bytes
    num_tokens: int
    corpus: bool  # ingested (has an embedding): evicted blind to usage
    last_used: float  # seconds since the epoch (write time if never read)
    uses: int


def recompute_cost(num_tokens: int) -> float:
    """Relative cost of recomputing one chunk's KV: linear layers plus attention over its own tokens."""
    return num_tokens * (1.0 + num_tokens / QUADRATIC_TOKENS)


def request_priority(entry: EntryStats, now: float) -> float:
    """Keep-worthiness of a request entry: (uses + 1) x recompute cost per byte / age. Lowest goes first."""
    age = max(now - entry.last_used, 1.0)
    return (entry.uses + 1) * recompute_cost(entry.num_tokens) / max(entry.num_bytes, 1) / age


def corpus_priority(entry: EntryStats) -> float:
    """Keep-worthiness of a corpus entry, blind to usage: recompute cost per byte."""
    return recompute_cost(entry.num_tokens) / max(entry.num_bytes, 1)


def eviction_order(entries: list[EntryStats], now: float) -> list[EntryStats]:
    """All entries, the first to evict first: request entries by `request_priority`, then corpus entries
    by `corpus_priority` (ties: higher chunk id, i.e. newer, first)."""
    requests = sorted((e for e in entries if not e.corpus), key=lambda e: (request_priority(e, now), -e.chunk_id))
    corpus = sorted((e for e in entries if e.corpus), key=lambda e: (corpus_priority(e), -e.chunk_id))
    return requests + corpus


def choose_victims(entries: list[EntryStats], total_bytes: int, max_bytes: int, now: float) -> list[EntryStats]:
    """The fewest entries, in eviction order, whose removal brings `total_bytes` to `max_bytes` or below.

    Returns every entry if even that is not enough (the caller reports the shortfall).
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    victims, excess = [], total_bytes - max_bytes
    for entry in eviction_order(entries, now):
        if excess <= 0:
            break
        victims.append(entry)
        excess -= entry.num_bytes
    return victims
