"""Copy a store into another backend (e.g. an LMDB store into the shared Redis tier): every chunk's KV entry
(its bytes as stored, checksum included), metadata and embedding, the source records and the manifest."""
from __future__ import annotations

from typing import Callable

BATCH = 64  # chunks per write transaction


def copy_store(src, dst, *, on_batch: Callable[[int], None] | None = None) -> dict:
    """Copy everything `src` holds into `dst` (store backends, store/backend.py), in chunk id order, so an
    empty `dst` gets the same ids when `src` has none retired (retired ids leave gaps that `dst` closes).
    Chunks `dst` already holds keep theirs. A chunk whose KV was evicted in `src` is left out (a store entry
    needs its KV), and the sources that hold it are copied as incomplete, so that re-ingesting them into
    `dst` restores it. Per-tenant document quotas are not copied: they start from zero in `dst`.

    Returns:
        {"chunks": chunks copied (or already there), "evicted_left_out": chunks without a KV in `src`,
         "sources": source records copied}.
    Raises:
        ValueError: `dst` holds a store built with another manifest (model, prompt, dtype).
    """
    manifest = src.manifest
    if manifest is not None:
        theirs = dst.manifest
        shaping = ("format_version", "model_fingerprint", "kv_dtype", "prefix_hash", "embedder_fingerprint")
        if theirs is not None and any(theirs.get(k) != manifest.get(k) for k in shaping):
            raise ValueError(f"{dst.path} holds a store built with other settings ({theirs.get('model')}, "
                             f"{theirs.get('kv_dtype')}); copy into an empty store")
        if theirs is None:
            dst.write_manifest(manifest)
    ids, vecs = src.embeddings()
    embeddings = dict(zip(ids.tolist(), vecs))
    next_id, _ = src.watermark()
    copied = left_out = 0
    absent: set[str] = set()
    for lo in range(0, next_id, BATCH):
        span = list(range(lo, min(lo + BATCH, next_id)))
        keys = [(i, k) for i, k in zip(span, src.key_for_id(span)) if k is not None]
        items = []
        with src.reader() as reader:
            reader.prefetch([k for _, k in keys], meta=True)
            for chunk_id, key in keys:
                meta = reader.meta(key)
                if meta is None:
                    continue
                raw = reader.raw_kv(key)
                items.append((key, None if raw is None else bytes(raw), {k: v for k, v in meta.items() if k != "id"},
                              embeddings.get(chunk_id)))
        with_kv = [item for item in items if item[1] is not None]
        absent.update(item[0].hex() for item in items if item[1] is None)
        if with_kv:
            dst.put_chunks(with_kv)
        copied += len(with_kv)
        left_out += len(items) - len(with_kv)
        if on_batch is not None:
            on_batch(len(items))
    sources = src.sources()
    for path, record in sources.items():
        if absent & set(record.get("keys", [])):
            record = {**record, "complete": False}
        dst.put_source(path, record)
    return {"chunks": copied, "evicted_left_out": left_out, "sources": len(sources)}
