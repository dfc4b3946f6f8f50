"""A local LMDB store in front of the shared Redis tier: a near cache with write-through.

Spec: `lmdb:DIR+redis://host:port/db[?prefix=NAME]`. The shared tier is the truth for what the store holds
(manifest, ids, embeddings, sources, quotas); the near store keeps KV entries (and their metadata) this
replica has written or read:
- a KV read tries the near store first; a near miss is read from Redis (pipelined) and copied into the
  near store after the read, so the next query on this replica reads it locally;
- a write goes to Redis and to the near store; if Redis is unreachable the near store still gets it and
  the write raises StoreUnavailableError (the caller decides: a query goes on, an ingest stops);
- while Redis is unreachable, retrieval uses the near store's metadata and the KV it holds; the rest is
  computed by the caller.
The near store's cap (`max_store_bytes`) evicts only near copies; the retrieval index is saved in DIR.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import numpy as np

from .errors import CorruptEntryError, StoreError, StoreUnavailableError
from .kvstore import KVReader, KVStore
from .redisstore import RedisReader, RedisStore

log = logging.getLogger(__name__)


class TieredReader:
    def __init__(self, near: KVReader, far: RedisReader):
        self._near, self._far = near, far
        self.fetched: dict[bytes, bytes] = {}  # entries read from Redis, to copy into the near store
        self.damaged: set[bytes] = set()  # near copies that failed their checksum: replaced by the fetched ones

    def prefetch(self, keys: Sequence[bytes], *, kv: bool = True, meta: bool = False) -> None:
        far_kv = [k for k in keys if self._near.raw_kv(k) is None] if kv else []  # presence only: no decoding
        self._far.prefetch(far_kv, kv=True)
        if meta:
            self._far.prefetch(keys, kv=False, meta=True)

    def kv(self, key: bytes, verify: bool = True):
        entry = self._near_kv(key, verify)
        if entry is not None:
            return entry
        entry = self._far.kv(key, verify)  # a damaged shared entry raises: the caller recomputes and rewrites
        if entry is not None:
            self.fetched[key] = self._far.raw_kv(key)
        return entry

    def meta(self, key: bytes) -> dict | None:
        try:
            return self._far.meta(key)
        except StoreUnavailableError:
            meta = self._near.meta(key)
            if meta is None:
                raise
            return {k: v for k, v in meta.items() if k != "id"}  # the near store's id is its own

    def _near_kv(self, key: bytes, verify: bool):
        if key in self.damaged:
            return None
        try:
            return self._near.kv(key, verify)
        except CorruptEntryError as e:  # the shared copy is read instead, and replaces it
            log.warning("near copy of chunk %s is damaged (%s); reading the shared one", key.hex()[:16], e)
            self.damaged.add(key)
            return None


class TieredStore:
    """`KVStore`'s interface over a near LMDB store and the shared Redis store (module docstring)."""

    def __init__(self, near: KVStore, far: RedisStore):
        self.near, self.far = near, far
        self.path = near.path  # the retrieval index is saved here
        self.readonly = far.readonly
        try:
            manifest = far.manifest
            if manifest is not None and near.manifest != manifest and not near.readonly:
                near.write_manifest(manifest)
        except BaseException:
            self.close()
            raise

    @property
    def max_kv_bytes(self) -> int | None:
        return self.near.max_kv_bytes

    @max_kv_bytes.setter
    def max_kv_bytes(self, value: int | None) -> None:
        self.near.max_kv_bytes = value

    @property
    def damage(self) -> dict[str, int]:
        return {kind: self.near.damage[kind] + self.far.damage[kind] for kind in self.far.damage}

    @property
    def outages(self) -> int:
        return self.far.outages

    @property
    def available(self) -> bool:
        return self.far.available

    def close(self) -> None:
        try:
            self.near.close()
        finally:
            self.far.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- chunks

    # What is stored is the shared tier's to say: a near copy may outlive its chunk there (retired by another
    # replica, a write that reached only the near store during an outage, a Redis that lost its data), and
    # counting it as stored would make an ingest skip a chunk that no replica can retrieve. Only while Redis
    # is unreachable do near copies stand in for it.

    def __contains__(self, key: bytes) -> bool:
        stored = key in self.far
        return stored if self.far.available else key in self.near

    def __len__(self) -> int:
        return len(self.far)

    def missing(self, keys: Sequence[bytes]) -> list[bytes]:
        missing = self.far.missing(keys)
        return missing if self.far.available else self.near.missing(keys)

    def put_chunks(self, items) -> dict[bytes, int]:
        """Write through: Redis first (its ids are the store's), then the near copy. With Redis unreachable
        the near copy is still written and StoreUnavailableError is raised."""
        items = list(items)
        try:
            ids = self.far.put_chunks(items)
        except StoreUnavailableError:
            self._near_put([(key, kv, meta) for key, kv, meta, _ in items])
            raise
        self._near_put([(key, kv, meta) for key, kv, meta, _ in items])
        return ids

    def put_kv(self, key: bytes, kv, meta: dict) -> int:
        return self.put_chunks([(key, kv, meta, None)])[key]

    @contextlib.contextmanager
    def reader(self) -> Iterator[TieredReader]:
        with self.near.reader() as near, self.far.reader() as far:
            reader = TieredReader(near, far)
            yield reader
            fetched, damaged = dict(reader.fetched), reader.damaged
            far.prefetch(list(fetched), kv=False, meta=True)  # one round trip for the copies' metadata
            metas = {}
            for key in fetched:
                with contextlib.suppress(StoreError, CorruptEntryError):
                    metas[key] = {k: v for k, v in (far.meta(key) or {}).items() if k != "id"}
        # Outside the read transaction: an LMDB write may need to grow the map.
        self._near_put([(key, buf, metas.get(key, {})) for key, buf in fetched.items() if key not in damaged])
        if damaged & fetched.keys() and not self.near.readonly:
            with contextlib.suppress(StoreError, ValueError):
                self.near.replace_kv([(key, fetched[key]) for key in damaged & fetched.keys()])

    def get_meta(self, key: bytes) -> dict | None:
        with self.reader() as reader:
            return reader.meta(key)

    def replace_kv(self, items) -> None:
        items = list(items)
        try:
            self.near.replace_kv(items)
        except StoreError as e:
            log.warning("could not rewrite near copies: %s", e)
        self.far.replace_kv(items)

    def delete_chunks(self, keys: Sequence[bytes]) -> int:
        keys = list(keys)
        found = self.far.delete_chunks(keys)
        self.near.delete_chunks(keys)
        return found

    def touch(self, keys: Sequence[bytes]) -> None:
        self.near.touch(keys)

    def kv_bytes(self) -> int:
        """KV bytes of the near copies: what `max_store_bytes` caps here."""
        return self.near.kv_bytes()

    def evict_to(self, max_bytes: int, *, protect=()) -> tuple[int, int]:
        return self.near.evict_to(max_bytes, protect=protect)

    def stats(self) -> dict:
        return {**self.far.stats(), **{f"near_{k}": v for k, v in self.near.stats().items()}}

    def write_manifest(self, manifest: dict) -> None:
        self.far.write_manifest(manifest)
        self.near.write_manifest(manifest)

    @property
    def manifest(self) -> dict | None:
        try:
            return self.far.manifest
        except StoreUnavailableError:
            manifest = self.near.manifest
            if manifest is None:
                raise
            return manifest

    # ---- everything else is the shared tier's

    def num_embeddings(self) -> int:
        return self.far.num_embeddings()

    def key_for_id(self, ids) -> list[bytes | None]:
        return self.far.key_for_id(ids)

    def embeddings(self, since_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        return self.far.embeddings(since_id)

    def watermark(self) -> tuple[int, int]:
        return self.far.watermark()

    def embedding(self, key: bytes) -> np.ndarray | None:
        return self.far.embedding(key)

    def put_embedding(self, key: bytes, emb) -> None:
        self.far.put_embedding(key, emb)

    def rewrite_meta(self, key: bytes, meta: dict) -> None:
        self.far.rewrite_meta(key, meta)

    def scan(self, verify: bool = True) -> dict[str, list[bytes]]:
        return self.far.scan(verify)

    def document_bytes(self, namespace: str) -> int:
        return self.far.document_bytes(namespace)

    def charge_documents(self, namespace: str, costs, quota) -> list[bool]:
        return self.far.charge_documents(namespace, costs, quota)

    def get_source(self, path: str) -> dict | None:
        return self.far.get_source(path)

    def put_source(self, path: str, record: dict) -> None:
        self.far.put_source(path, record)

    def delete_source(self, path: str) -> None:
        self.far.delete_source(path)

    def sources(self) -> dict[str, dict]:
        return self.far.sources()

    def _near_put(self, items) -> None:
        """Best effort: a near copy that cannot be written (disk full) is only a later near miss."""
        items = [(key, kv, meta, None) for key, kv, meta in items if kv is not None]
        if not items or self.near.readonly:
            return
        try:
            self.near.put_chunks(items)
        except (StoreError, ValueError) as e:
            log.warning("could not keep %d near copies in %s: %s", len(items), self.near.path, e)
