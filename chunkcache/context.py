"""Context-enriched chunk entries (FusionRAG): each chunk's KV also computed after its nearest neighbour.

A plain entry holds a chunk's KV computed right after the prompt prefix. That is what full prefill gives
the first chunk of a prompt, but chunks 2..k never saw the documents before them: blend has to repair
that at query time. With `chunk_context="neighbour"` (a store setting), ingest also computes every chunk
after the prefix and its nearest stored neighbour chunk (by the retrieval embedding), and a query places
that entry for every chunk but the first. Where related chunks are retrieved together, the neighbour is
often a chunk of the same prompt, so the entry has already seen much of the context full prefill gives
it (docs/FIDELITY.md: blend 15%, held-out KL 0.048 -> 0.028).

In the store the enriched entry is a chunk without an embedding (never retrieved by itself), keyed
`chunk_key(..., context_ids=the neighbour's token ids)`, its keys re-rotated to the positions right after
the prefix as a plain entry's are. Its metadata {"kind": "context", "of", "neighbour", "token_ids",
"context_ids"} is enough to recompute it (`chunkcache verify --repair`); the chunk's own metadata gains
"context_key". An evicted or damaged enriched entry falls back to the plain one, so it only costs fidelity.

The neighbour is the nearest chunk stored when the chunk is enriched: a later ingest may add a nearer one,
and the chunk keeps the entry it has (its key still names exactly what it holds).
"""
from __future__ import annotations

import logging

import numpy as np

from .kvcompute import context_chunk_kv, prefix_cache
from .runtime import Runtime

log = logging.getLogger(__name__)

NEIGHBOUR_CANDIDATES = 4  # index hits read per chunk: itself, plus room for ones gone since the index was built
WRITE_BATCH = 16  # entries per store transaction, as at ingest


def enriched(rt: Runtime) -> bool:
    return rt.config.chunk_context == "neighbour"


def enrich_chunks(rt: Runtime, keys: list[bytes], *, bar=None) -> tuple[int, int]:
    """Store the enriched entry of every chunk in `keys` that lacks one (a no-op unless the store's
    chunk_context is "neighbour"); the chunks must be stored and indexed. Returns (entries computed, tokens
    computed). The neighbour's stored entry is its KV after the prefix, so only the chunk's tokens run (the
    neighbour's are computed too where its entry is gone): ingest computes each token about twice in all."""
    if not enriched(rt) or not keys:
        return 0, 0
    todo = unenriched(rt, list(dict.fromkeys(keys)))
    if bar is not None:
        bar.reset(total=len(todo))
    pairs = nearest_neighbours(rt, todo)
    if not pairs:
        return 0, 0
    metas = _metas(rt, {k for pair in pairs for k in pair})
    pairs = [(k, n) for k, n in pairs if k in metas and n in metas]  # damaged, or retired meanwhile: skipped
    if not pairs:
        return 0, 0
    prefix_ids = list(rt.template.prefix_ids)
    longest = max(len(metas[k]["token_ids"]) + len(metas[n]["token_ids"]) for k, n in pairs)
    computed = tokens = 0
    with rt.lock:
        scratch = prefix_cache(rt.lm, prefix_ids, len(prefix_ids) + longest)
        for start in range(0, len(pairs), WRITE_BATCH):
            batch = pairs[start:start + WRITE_BATCH]
            links = [(key, rt.key_for(metas[key]["token_ids"], context_ids=metas[neighbour]["token_ids"]))
                     for key, neighbour in batch]
            # One existence check per batch; a stored one was written by a run that stopped before linking it.
            missing = set(rt.store.kv.missing([context_key for _, context_key in links]))
            items = []
            for (key, neighbour), (_, context_key) in zip(batch, links):
                chunk_ids, context_ids = metas[key]["token_ids"], metas[neighbour]["token_ids"]
                if context_key in missing:
                    context_kv = plain_kv(rt, neighbour)
                    kv = context_chunk_kv(rt.lm, scratch, len(prefix_ids), context_ids, chunk_ids, rt.kv_dtype,
                                          context_kv=context_kv)
                    items.append((context_key, kv, context_meta(key, neighbour, chunk_ids, context_ids), None))
                    computed += 1
                    tokens += len(chunk_ids) + (len(context_ids) if context_kv is None else 0)
                if bar is not None:
                    bar.update(1)
            rt.store.kv.put_chunks(items)
            # Linked only once the entry is stored, so a link names a written entry (a later eviction falls back).
            for key, context_key in links:
                rt.store.kv.rewrite_meta(key, {**metas[key], "context_key": context_key.hex()})
    return computed, tokens


def plain_kv(rt: Runtime, key: bytes):
    """A copy of `key`'s stored entry as the pipeline would place it, or None (evicted or damaged: recompute)."""
    from store import CorruptEntryError

    with rt.store.kv.reader() as reader:
        try:
            entry = reader.kv(key)
        except CorruptEntryError:
            return None
        return None if entry is None else entry.to(rt.lm.device, rt.lm.dtype, copy=True)


def context_meta(key: bytes, neighbour: bytes, chunk_ids: list[int], context_ids: list[int]) -> dict:
    return {"kind": "context", "of": key.hex(), "neighbour": neighbour.hex(), "token_ids": list(chunk_ids),
            "context_ids": list(context_ids), "num_tokens": len(chunk_ids)}


def nearest_neighbours(rt: Runtime, keys: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(chunk, its nearest other indexed chunk) for each of `keys` that has an embedding and a neighbour."""
    vectors = {k: _embedding(rt, k) for k in keys}
    keys = [k for k in keys if vectors[k] is not None]
    index = rt.store.index()
    if not keys or index.ntotal < 2:
        return []
    _, ids = index.search(np.stack([vectors[k] for k in keys]).astype(np.float32),
                          min(NEIGHBOUR_CANDIDATES, index.ntotal))
    found = rt.store.kv.key_for_id([int(i) for i in ids.reshape(-1)])
    width = ids.shape[1]
    pairs = []
    for row, key in enumerate(keys):
        hits = [k for k in found[row * width:(row + 1) * width] if k is not None and k != key]
        if hits:
            pairs.append((key, hits[0]))
    return pairs


def _embedding(rt: Runtime, key: bytes):
    from store import CorruptEntryError

    try:
        return rt.store.kv.embedding(key)
    except CorruptEntryError as exc:  # `chunkcache verify --repair` re-embeds it; the chunk stays plain meanwhile
        log.warning("%s; its context-enriched entry is not computed", exc)
        return None


def linked_entries(rt: Runtime, keys: list[bytes]) -> list[bytes]:
    """The enriched entries that `keys`' metadata links to (to retire with them)."""
    if not enriched(rt):
        return []
    return [bytes.fromhex(m["context_key"]) for m in _metas(rt, set(keys)).values() if m.get("context_key")]


def unlinked(rt: Runtime, keys: list[bytes]) -> list[bytes]:
    """The stored chunks of `keys` whose metadata links no enriched entry."""
    metas = _metas(rt, set(keys))
    return [k for k in keys if k in metas and not metas[k].get("context_key")]


def unenriched(rt: Runtime, keys: list[bytes]) -> list[bytes]:
    """The chunks of `keys` whose enriched entry is not linked, or is linked but gone (evicted, retired)."""
    metas = _metas(rt, set(keys))
    linked = {k: bytes.fromhex(m["context_key"]) for k, m in metas.items() if m.get("context_key")}
    gone = set(rt.store.kv.missing(list(linked.values())))
    return [k for k in keys if k in metas and (k not in linked or linked[k] in gone)]


def _metas(rt: Runtime, keys: set[bytes]) -> dict[bytes, dict]:
    """Stored chunks' metadata (the ones stored; damaged ones are left out, logged)."""
    from store import CorruptEntryError

    out = {}
    with rt.store.kv.reader() as reader:
        reader.prefetch(list(keys), kv=False, meta=True)
        for key in keys:
            try:
                meta = reader.meta(key)
            except CorruptEntryError as exc:
                log.warning("%s; its context-enriched entry is not computed", exc)
                continue
            if meta is not None:
                out[key] = meta
    return out
