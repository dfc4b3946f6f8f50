"""`chunkcache verify [--repair]`: check every stored checksum, recompute what can be, rebuild the index.

What repair does per finding (store/README.md has the table):
    damaged KV            recomputed from the chunk's token ids (in its metadata) and overwritten
    damaged embedding     re-embedded from the chunk's text and overwritten
    damaged metadata      the chunk is deleted and the sources that held it are marked incomplete, so the
                          next `chunkcache ingest` of them recomputes it (the text is only in the source)
    legacy meta/emb       rewritten with a checksum
    orphan id rows        deleted
then the Faiss index is rebuilt from the stored embeddings.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from store import CorruptEntryError

from .ingest import PendingChunk, recompute_kv
from .runtime import Runtime
from .storedir import ChunkStore

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    num_chunks: int = 0
    damaged: dict[str, int] = field(default_factory=dict)  # kind -> entries found damaged
    legacy: int = 0
    orphan_ids: int = 0
    index_ok: bool = True
    repaired: dict[str, int] = field(default_factory=dict)  # what --repair did
    sources_to_reingest: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing left to repair (after --repair: everything was repaired or handed to ingest)."""
        if self.repaired:
            return not self.sources_to_reingest
        return not any(self.damaged.values()) and not self.orphan_ids and self.index_ok

    def summary(self) -> str:
        lines = [f"chunks: {self.num_chunks}; damaged: " + ", ".join(f"{k} {v}" for k, v in self.damaged.items())
                 + f"; without checksums (older format): {self.legacy}; orphan id rows: {self.orphan_ids}; "
                 f"index: {'ok' if self.index_ok else 'damaged or stale'}"]
        if self.repaired:
            lines.append("repaired: " + ", ".join(f"{k} {v}" for k, v in self.repaired.items()))
        if self.sources_to_reingest:
            lines.append("re-run `chunkcache ingest` on these sources to restore chunks whose metadata was lost: "
                         + ", ".join(self.sources_to_reingest))
        elif not self.repaired and not self.clean:
            lines.append("run `chunkcache verify --repair` to fix this")
        return "\n".join(lines)


def verify_store(store: ChunkStore) -> tuple[VerifyReport, dict[str, list[bytes]]]:
    """Check every checksum and the index, changing nothing. Returns the report and the keys found."""
    found = store.kv.scan()
    report = VerifyReport(num_chunks=len(store.kv), legacy=len(found["legacy"]), orphan_ids=len(found["orphan_ids"]),
                          damaged={k: len(found[k]) for k in ("kv", "meta", "emb")})
    report.index_ok = _index_ok(store)
    return report, found


def repair_store(rt: Runtime) -> VerifyReport:
    """Verify, then fix everything found (see the module docstring); the index is always rebuilt."""
    store = rt.store
    report, found = verify_store(store)
    done = {"kv": 0, "emb": 0, "meta (chunks deleted)": 0, "legacy": 0, "orphan_ids": 0}
    bad_meta = set(found["meta"])
    kv_todo, prefix_damaged = [], False
    for key in found["kv"]:
        if key in bad_meta:
            continue
        meta = store.kv.get_meta(key)
        if meta.get("kind") == "prefix":
            prefix_damaged = True
        else:
            kv_todo.append(PendingChunk(key, meta["token_ids"], meta.get("text", ""), meta))
    recompute_kv(rt, kv_todo)
    if prefix_damaged:
        _recompute_prefix(rt)
    done["kv"] = len(kv_todo) + prefix_damaged
    emb_todo = [k for k in found["emb"] if k not in bad_meta]
    if emb_todo:
        texts = [store.kv.get_meta(k)["text"] for k in emb_todo]
        for key, vec in zip(emb_todo, rt.embedder.encode(texts)):
            store.kv.put_embedding(key, np.asarray(vec, dtype=np.float32))
        done["emb"] = len(emb_todo)
    if bad_meta:
        report.sources_to_reingest = _mark_sources_incomplete(store, bad_meta)
        done["meta (chunks deleted)"] = store.kv.delete_chunks(sorted(bad_meta))
    for key in found["legacy"]:
        _rewrite_legacy(store, key)
    done["legacy"] = len(found["legacy"])
    if found["orphan_ids"]:
        store.kv.delete_chunks(found["orphan_ids"])
        done["orphan_ids"] = len(found["orphan_ids"])
    store.rebuild_index()
    report.repaired = {k: v for k, v in done.items() if v} or {"nothing to repair": 0}
    return report


def _index_ok(store: ChunkStore) -> bool:
    """Whether the saved index loads and matches the store as it is (no rebuild needed)."""
    return store.reload_index() is None


def _recompute_prefix(rt: Runtime) -> None:
    from .kvcompute import extract_kv, prefix_cache

    ids = list(rt.template.prefix_ids)
    rt.store.kv.replace_kv([(rt.prefix_key(), extract_kv(prefix_cache(rt.lm, ids, len(ids)), 0, len(ids),
                                                          rt.kv_dtype))])


def _mark_sources_incomplete(store: ChunkStore, keys: set[bytes]) -> list[str]:
    hexes = {k.hex() for k in keys}
    marked = []
    for source, record in store.kv.sources().items():
        if hexes & set(record.get("keys", [])):
            store.kv.put_source(source, {**record, "complete": False})
            marked.append(source)
    return marked


def _rewrite_legacy(store: ChunkStore, key: bytes) -> None:
    try:
        store.kv.rewrite_meta(key, store.kv.get_meta(key))
        emb = store.kv.embedding(key)
        if emb is not None:
            store.kv.put_embedding(key, emb)
    except CorruptEntryError as exc:  # found damaged after the scan: the next verify reports it
        log.warning("%s", exc)
