"""A store directory: the LMDB KV store (the source of truth), its manifest and the Faiss index.

Layout of DIR (see store/README.md for the LMDB value format):
    DIR/kv.lmdb/          LMDB environment: manifest, chunk KVs, chunk metadata, embeddings, ids, sources
    DIR/index.faiss       Faiss index over chunk embeddings (derived: rebuilt from LMDB when stale)
    DIR/index.faiss.json  the index's kind and dimension
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retriever import VectorIndex
from store import KV_FORMAT_VERSION, KVStore, StoreError

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"


class StoreMismatchError(StoreError):
    """The store was built with other models or settings than this run asks for."""


class ChunkStore:
    """One store directory, opened once per process (after any fork)."""

    def __init__(self, path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly and not (self.path / "kv.lmdb").exists():
            raise StoreError(f"no chunkcache store at {self.path}; build one with "
                             f"`chunkcache ingest PATH --store {self.path}`")
        self.kv = KVStore(self.path, readonly=readonly)
        self._index: VectorIndex | None = None

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
        for name, what in (("model_fingerprint", "model"), ("embedder_fingerprint", "embedder"),
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
        """The Faiss index, loaded from disk, or rebuilt from the stored embeddings when missing or stale."""
        if self._index is None:
            path = self.path / INDEX_FILE
            expected = self.kv.num_embeddings()
            if path.exists():
                index = VectorIndex.load(path)
                if index.ntotal == expected:
                    self._index = index
                    return index
                log.warning("index %s holds %d vectors but the store has %d: rebuilding it", path,
                            index.ntotal, expected)
            # Read the embeddings only when the index has to be rebuilt from them.
            self._index = self._build_index(*self.kv.embeddings())
        return self._index

    def add_to_index(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors just committed to the store (loading the index first would already include them)."""
        if self._index is None:
            self.index()
        elif len(ids):
            self._index.add(ids, vecs)

    def save_index(self) -> None:
        if self._index is not None:
            self._index.save(self.path / INDEX_FILE)

    def _build_index(self, ids: np.ndarray, vecs: np.ndarray) -> VectorIndex:
        manifest = self.manifest or {}
        dim = vecs.shape[1] if len(vecs) else int(manifest.get("embedding_dim", 0))
        if not dim:
            raise StoreError(f"store {self.path} has no embeddings and no recorded embedding size")
        kind = manifest.get("index_kind", "flat")
        index = VectorIndex.build(ids, vecs, kind=kind) if len(ids) else VectorIndex(dim, kind)
        index.save(self.path / INDEX_FILE)
        return index

    def close(self) -> None:
        self.kv.close()


def _describe(manifest: dict, name: str) -> str:
    value = manifest.get(name)
    if name == "model_fingerprint":
        return f"{manifest.get('model', '?')!r} (fingerprint {str(value)[:12]})"
    if name == "embedder_fingerprint":
        return f"{manifest.get('embedder', '?')!r} (fingerprint {str(value)[:12]})"
    return repr(value)
