"""Which store a `--store` value names, and the interface every store backend offers.

A store spec is one of:
    DIR  or  lmdb:DIR                      the embedded LMDB store (store/kvstore.py), the default
    redis://[:password@]host:port/db[?prefix=NAME]   the shared tier in Redis (store/redisstore.py);
                                           also rediss:// (TLS) and unix:///path/to/socket
    lmdb:DIR+redis://...                   a local LMDB near cache in front of Redis (store/tiered.py)

Every backend has the methods of `StoreBackend`, with LMDB's semantics (store/README.md); where a
backend differs (who caps its size, what happens while it is unreachable) its module says so.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

REMOTE_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class StoreSpec:
    text: str = field(repr=False)  # as given (with any password: never log it; use `describe`)
    local: Path | None  # the LMDB directory, if any
    remote: str | None = field(repr=False)  # the Redis URL, if any

    @property
    def index_dir(self) -> Path | None:
        """Where this process saves the retrieval index (none for Redis alone: rebuilt in memory at open)."""
        return self.local

    def describe(self) -> str:
        from .redisstore import redacted

        if self.remote is None:
            return str(self.local)
        return (f"lmdb:{self.local}+" if self.local else "") + redacted(self.remote)


def parse_store_spec(spec) -> StoreSpec:
    """Read a `--store` value (see the module docstring).

    Raises:
        ValueError: an empty spec, or `lmdb:` without a directory.
    """
    text = os.fspath(spec) if not isinstance(spec, str) else spec
    if not text:
        raise ValueError("the store is empty: give a directory or a redis:// URL")
    if text.startswith(REMOTE_SCHEMES):
        return StoreSpec(text, None, text)
    if text.startswith("lmdb:"):
        rest = text[len("lmdb:"):]
        for scheme in REMOTE_SCHEMES:
            local, sep, remote = rest.partition("+" + scheme)
            if sep:
                if not local:
                    raise ValueError(f"store lmdb:+{scheme}...: give the near cache's directory: lmdb:DIR+{scheme}...")
                return StoreSpec(text, Path(local), scheme + remote)
        if not rest:
            raise ValueError(f"store {text!r}: give a directory after lmdb:")
        return StoreSpec(text, Path(rest), None)
    return StoreSpec(text, Path(text), None)


def open_backend(spec: StoreSpec, *, readonly: bool = False) -> "StoreBackend":
    """Open the store `spec` names (LMDB stores are shared per process: see `KVStore.shared`)."""
    from .kvstore import KVStore

    if spec.remote is None:
        return KVStore.shared(spec.local, readonly=readonly)
    from .redisstore import RedisStore

    far = RedisStore(spec.remote, readonly=readonly)
    if spec.local is None or (readonly and not _lmdb_exists(spec.local)):
        return far  # a read-only tool on a replica whose near cache does not exist yet reads the shared tier
    from .tiered import TieredStore

    try:
        near = KVStore.shared(spec.local, readonly=readonly)
    except BaseException:
        far.close()
        raise
    return TieredStore(near, far)


def store_exists(spec: StoreSpec) -> bool:
    """Whether a store was written there (for Redis: a manifest under the prefix; connects to find out).

    Raises:
        StoreUnavailableError: the Redis named cannot be reached.
    """
    if spec.remote is None:
        return _lmdb_exists(spec.local)
    from .redisstore import RedisStore

    with RedisStore(spec.remote) as far:
        return far.manifest is not None


def _lmdb_exists(directory: Path) -> bool:
    return (directory / "kv.lmdb" / "data.mdb").is_file()


class StoreReader(Protocol):
    def prefetch(self, keys: Sequence[bytes], *, kv: bool = True, meta: bool = False) -> None: ...
    def kv(self, key: bytes, verify: bool = True): ...
    def meta(self, key: bytes) -> dict | None: ...


class StoreBackend(Protocol):
    """What the pipeline, ingest and repair use of a store; `KVStore` documents each method."""

    path: object
    readonly: bool
    max_kv_bytes: int | None
    damage: dict[str, int]

    def close(self) -> None: ...
    def __contains__(self, key: bytes) -> bool: ...
    def __len__(self) -> int: ...
    def num_embeddings(self) -> int: ...
    def missing(self, keys: Sequence[bytes]) -> list[bytes]: ...
    def put_chunks(self, items) -> dict[bytes, int]: ...
    def put_kv(self, key: bytes, kv, meta: dict) -> int: ...
    def reader(self) -> contextlib.AbstractContextManager[StoreReader]: ...
    def get_meta(self, key: bytes) -> dict | None: ...
    def key_for_id(self, ids) -> list[bytes | None]: ...
    def embeddings(self, since_id: int = 0) -> tuple[np.ndarray, np.ndarray]: ...
    def watermark(self) -> tuple[int, int]: ...
    def embedding(self, key: bytes) -> np.ndarray | None: ...
    def replace_kv(self, items) -> None: ...
    def put_embedding(self, key: bytes, emb) -> None: ...
    def rewrite_meta(self, key: bytes, meta: dict) -> None: ...
    def delete_chunks(self, keys: Sequence[bytes]) -> int: ...
    def touch(self, keys: Sequence[bytes]) -> None: ...
    def kv_bytes(self) -> int: ...
    def evict_to(self, max_bytes: int, *, protect=()) -> tuple[int, int]: ...
    def scan(self, verify: bool = True) -> dict[str, list[bytes]]: ...
    def document_bytes(self, namespace: str) -> int: ...
    def charge_documents(self, namespace: str, costs, quota) -> list[bool]: ...
    def get_source(self, path: str) -> dict | None: ...
    def put_source(self, path: str, record: dict) -> None: ...
    def delete_source(self, path: str) -> None: ...
    def sources(self) -> dict[str, dict]: ...
    @property
    def manifest(self) -> dict | None: ...
    def write_manifest(self, manifest: dict) -> None: ...
    def stats(self) -> dict: ...


__all__ = ["REMOTE_SCHEMES", "StoreBackend", "StoreReader", "StoreSpec", "open_backend", "parse_store_spec",
           "store_exists"]
