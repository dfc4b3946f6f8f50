"""A store: its backend (LMDB, Redis, or LMDB in front of Redis: the source of truth), its manifest and
the Faiss index over its embeddings.

Layout of an LMDB store's DIR (see store/README.md for the value formats):
    DIR/kv.lmdb/          LMDB environment: manifest, chunk KVs, chunk metadata, embeddings, ids, sources
    DIR/index.faiss       Faiss index over chunk embeddings (derived: rebuilt from the store when stale)
    DIR/index.faiss.json  the index's kind, dimension, checksum and the store watermark it covers
A tiered store (`lmdb:DIR+redis://...`) saves its index in DIR too; a store in Redis alone keeps it in
memory (built from the shared embeddings at open). Either way every process keeps its index in step with
the store's watermark before each query (`refresh`).
"""
from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

import numpy as np

from retriever import VectorIndex
from store import KV_FORMAT_VERSION, DiskFullError, StoreError, StoreUnavailableError, open_backend, parse_store_spec

from .config import LEGACY_STORE_VALUES

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"


class StoreMismatchError(StoreError):
    """The store was built with other models or settings than this run asks for."""


class ChunkStore:
    """One store directory, opened once per process (after any fork)."""

    def __init__(self, path, *, readonly: bool = False, max_store_bytes: int | None = None):
        """Open the store directory.

        Args:
            path: the directory, or a store spec (`redis://...`, `lmdb:DIR+redis://...`; store/backend.py).
            readonly: open for reading only (it must exist).
            max_store_bytes: cap on KV payload bytes for this process; None uses the manifest's
                `max_store_bytes` (None there too: no cap).
        """
        self.spec = parse_store_spec(path)
        # What messages name: the directory, or the spec without any password.
        self.path = self.spec.local if self.spec.remote is None else self.spec.describe()
        if readonly and self.spec.remote is None and not (self.spec.local / "kv.lmdb").exists():
            raise StoreError(f"no chunkcache store at {self.path}; build one with "
                             f"`chunkcache ingest PATH --store {self.path}`")
        # One LMDB environment per store per process: a second RAGPipeline on the same store shares it.
        self.kv = open_backend(self.spec, readonly=readonly)
        self._closed = False
        try:
            recorded = (self.kv.manifest or {}).get("max_store_bytes")
        except BaseException:
            self.close()  # release this store's reference: nobody else will
            raise
        # NOTE: the cap lives on the shared KVStore, so the last opener's cap applies to every holder.
        self.kv.max_kv_bytes = max_store_bytes if max_store_bytes is not None else recorded
        self._index: VectorIndex | None = None
        self._mark: tuple[int, int] = (0, 0)  # store watermark (next id, retired) the loaded index covers
        self.index_rebuilt: str | None = None  # why the saved index was not used, if it was rebuilt

    @property
    def manifest(self) -> dict | None:
        return self.kv.manifest

    def is_empty(self) -> bool:
        return self.manifest is None

    def check_manifest(self, expected: dict) -> None:
        """Refuse a store built by another model, embedder, format version or prompt.

        expected: the manifest this run would write; keys compared are those that shape the stored data.
        """
        found = self.manifest
        if found is None:
            return
        if found.get("format_version") != KV_FORMAT_VERSION:
            raise StoreMismatchError(
                f"store {self.path} uses KV format version {found.get('format_version')}, this chunkcache uses "
                f"{KV_FORMAT_VERSION}; rebuild it: remove {self.path} and re-run `chunkcache ingest`")
        found = LEGACY_STORE_VALUES | found
        for name, what in (("linear_dtype", "linear weight dtype (linear_dtype)"), ("model_fingerprint", "model"),
                           ("embedder_fingerprint", "embedder"),
                           ("kv_dtype", "KV dtype"), ("prefix_hash", "prompt prefix (system prompt/instruction)"),
                           ("chunk_tokens", "chunk size")):
            if name in expected and found.get(name) != expected[name]:
                raise StoreMismatchError(
                    f"store {self.path} was built with a different {what}: {_describe(found, name)} "
                    f"(this run: {_describe(expected, name)}). Open it with the settings it was built with "
                    f"(RAGPipeline.open / --store pick them up by default) or use another --store directory.")

    def write_manifest(self, manifest: dict) -> None:
        self.kv.write_manifest(manifest)

    # -- index ------------------------------------------------------------------------------
    def index(self) -> VectorIndex:
        """The Faiss index, loaded from disk, or rebuilt from the stored embeddings when missing, damaged or
        inconsistent with the store (logged)."""
        if self._index is None:
            self._index = self._load_index()
        return self._index

    def refresh(self) -> bool:
        """Catch the loaded index up with chunks other processes added or retired (one small read when
        nothing changed). Returns True if the index changed."""
        if self._index is None:
            self.index()
            return True
        try:
            mark = self.kv.watermark()
        except StoreUnavailableError:
            return False  # the shared tier is unreachable: answer from the index as it is (logged by the store)
        if mark == self._mark:
            return False
        if mark[1] != self._mark[1] or mark[0] < self._mark[0]:
            log.info("store %s retired chunks since the index was loaded: rebuilding the index", self.path)
            self._index = self._build_index(mark, *self.kv.embeddings(), save=False)
        else:
            added = self._extend(self._index, self._mark[0])
            log.info("store %s: %d chunk(s) added by another process, index extended", self.path, added)
        self._mark = mark
        return True

    def add_to_index(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors just committed to the store (loading the index first would already include them)."""
        if self._index is None:
            self.index()
        elif len(ids):
            self._index.add(ids, vecs)

    def save_index(self) -> None:
        """Write the index beside the store (atomically; on failure no temporary file is left).

        Raises:
            DiskFullError / StoreError: the write failed; the index in memory is intact.
        """
        if self._index is None or self.spec.index_dir is None:
            return
        self.refresh()  # so the saved watermark says exactly what the file holds
        self._index.extra["watermark"] = list(self._mark)
        path = self.spec.index_dir / INDEX_FILE
        try:
            self._index.save(path)
        except (OSError, RuntimeError) as e:
            if _disk_full(e, self.spec.index_dir):
                raise DiskFullError(f"disk full: cannot write the index {path} ({e}). It is "
                                    "rebuilt from the store on the next open; free disk space") from e
            raise StoreError(f"cannot write the index {path}: {e}") from e

    def reload_index(self) -> str | None:
        """Load the saved index again, as a new process would; returns why it had to be rebuilt, or None."""
        self._index, self.index_rebuilt = None, None
        self.index()
        return self.index_rebuilt

    def rebuild_index(self) -> VectorIndex:
        """Rebuild the index from the stored embeddings and save it (e.g. after a repair)."""
        self._index = self._build_index(self.kv.watermark(), *self.kv.embeddings())
        return self._index

    def _load_index(self) -> VectorIndex:
        mark = self.kv.watermark()
        if self.spec.index_dir is None:
            return self._build_index(mark, *self.kv.embeddings(), save=False)
        path = self.spec.index_dir / INDEX_FILE
        if not path.exists():
            self.index_rebuilt = "no saved index"
            return self._build_index(mark, *self.kv.embeddings())
        try:
            index = VectorIndex.load(path)
        except Exception as e:  # noqa: BLE001 - any damage (Faiss, JSON, checksum) means: rebuild, it is derived
            self.index_rebuilt = f"damaged: {e}"
            log.warning("index %s is damaged (%s): rebuilding it from the stored embeddings", path, e)
            return self._build_index(mark, *self.kv.embeddings())
        saved = index.extra.get("watermark")
        if saved is not None and (saved[1] != mark[1] or saved[0] > mark[0]):
            self.index_rebuilt = f"saved for watermark {saved}, store is at {list(mark)}"
            log.warning("index %s was saved for another state of the store (watermark %s, store %s): rebuilding "
                        "it from the stored embeddings", path, saved, list(mark))
            return self._build_index(mark, *self.kv.embeddings())
        if saved is not None and saved[0] < mark[0]:
            self._extend(index, saved[0])
        ids = index.ids()
        expected, next_id = self.kv.num_embeddings(), self.kv.watermark()[0]
        if index.ntotal != expected or (len(ids) and int(ids.max()) >= next_id):
            self.index_rebuilt = f"{index.ntotal} vectors for {expected} stored embeddings"
            log.warning("index %s holds %d vectors but the store has %d embeddings (next id %d): rebuilding it",
                        path, index.ntotal, expected, next_id)
            return self._build_index(mark, *self.kv.embeddings())
        self._mark = mark
        return index

    def _extend(self, index: VectorIndex, since_id: int) -> int:
        """Add the stored embeddings with id >= since_id that the index lacks; returns how many."""
        ids, vecs = self.kv.embeddings(since_id)
        new = ~np.isin(ids, index.ids())
        if new.any():
            index.add(ids[new], vecs[new])
        return int(new.sum())

    def _build_index(self, mark: tuple[int, int], ids: np.ndarray, vecs: np.ndarray, *,
                     save: bool = True) -> VectorIndex:
        manifest = self.manifest or {}
        dim = vecs.shape[1] if len(vecs) else int(manifest.get("embedding_dim", 0))
        if not dim:
            raise StoreError(f"store {self.path} has no embeddings and no recorded embedding size")
        kind = manifest.get("index_kind", "flat")
        self._index = VectorIndex.build(ids, vecs, kind=kind) if len(ids) else VectorIndex(dim, kind)
        self._mark = mark
        if save and not self.kv.readonly and self.spec.index_dir is not None:
            try:
                self.save_index()
            except StoreError as e:  # the index is derived: a query needs it in memory, not on disk
                log.warning("%s; using the rebuilt index from memory", e)
        return self._index

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:  # releases this store's one reference, once
            self._closed = True
            self.kv.close()


def _disk_full(exc: BaseException, path: Path) -> bool:
    """ENOSPC, or a failed write (Faiss hides errno) with under 16 MiB free."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(path).free < 16 << 20
    except OSError:
        return False


def _describe(manifest: dict, name: str) -> str:
    value = manifest.get(name)
    if name == "model_fingerprint":
        return f"{manifest.get('model', '?')!r} (fingerprint {str(value)[:12]})"
    if name == "embedder_fingerprint":
        return f"{manifest.get('embedder', '?')!r} (fingerprint {str(value)[:12]})"
    return repr(value)
