"""The shared tier: a chunk store in Redis that several servers read and write (store/README.md, "Redis").

It holds what the LMDB store holds, byte for byte the same values (KV entries with their crc32, checked
metadata and embedding records, the manifest, ids and source records), so chunk keys, checksums and the
index watermark mean the same here. Keys, under the URL's prefix P (`?prefix=`, default "chunkcache"):

    P:info        hash: manifest, next_id, retired, emb_dim, num_emb, kv_bytes, num_tokens, document_bytes/<ns>
    P:kv:<key>    KV entry, with an expiry decades away: under `maxmemory-policy volatile-lru` these are the
                  only keys Redis may evict, and an evicted one is a miss that is recomputed and stored again
    P:meta:<key>  metadata record (JSON with the chunk's id)
    P:emb:<key>   embedding record
    P:ids         hash: chunk id (decimal) -> key
    P:sources     hash: source -> JSON ingest record

Writers that race (two replicas storing the same new chunk) are serialised by optimistic transactions
(WATCH on the info hash and the chunks' metadata): a chunk gets exactly one id. Reads of the retrieved
chunks are one pipelined round trip.

When Redis cannot be reached, reads degrade to misses (the caller computes) and to what this process has
already seen (ids, metadata, manifest); writes raise StoreUnavailableError. Each failed call is counted
in `outages`, and the first of an outage and the recovery are logged.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Iterator, Sequence
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np

from .codec import decode_kv, entry_sizes
from .errors import CorruptEntryError, DiskFullError, StoreError, StoreUnavailableError
from .items import add_sizes, check_emb_dim, check_record, encode_entry, encode_item, meta_record, unpack_item
from .records import decode_emb, decode_meta, encode_emb, encode_meta

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "chunkcache"
KV_EXPIRE_S = 50 * 365 * 86400  # marks KV entries (only them) as evictable under volatile-* policies
_HEADER_BYTES = 64  # a KV entry's header (ndim 5): enough to read its shape without its payload
_META_MEMO = 50_000  # metadata (and ids) of retrieved chunks kept in memory, for retrieval while Redis is down
_RETRY_AFTER_S = 1.0  # while Redis is down, calls within this long of the last failure fail at once
_BATCH = 2_000  # keys per pipelined round trip when scanning


def split_redis_url(url: str) -> tuple[str, str]:
    """(the URL the redis client gets, the key prefix): `?prefix=NAME` is ours, everything else is Redis's."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    prefix = query.pop("prefix", [DEFAULT_PREFIX])[-1]
    if not prefix or any(c in prefix for c in " \n*?[]"):
        raise ValueError(f"store URL {redacted(url)}: prefix must be a plain non-empty name (no spaces or glob "
                         "characters)")
    return urlunsplit(parts._replace(query=urlencode(query, doseq=True))), prefix


def redacted(url: str) -> str:
    """The URL without its password (in the authority or as `?password=`), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        port = f":{parts.port}" if parts.port else ""
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}{port}")
    query = parse_qs(parts.query, keep_blank_values=True)
    if "password" in query:
        query["password"] = ["***"]
        parts = parts._replace(query=urlencode(query, doseq=True, safe="*"))
    return urlunsplit(parts)


class RedisReader:
    """Reads of one query: `prefetch` fetches the keys it will need in one round trip; values are then
    served from it. Tensors from `kv` are valid inside the `with store.reader()` block, as with LMDB."""

    def __init__(self, store: "RedisStore"):
        self._store = store
        self._kv: dict[bytes, bytes | None] = {}
        self._meta: dict[bytes, bytes | None] = {}
        self._down = False  # Redis failed during this read: what is not fetched yet is a miss

    def prefetch(self, keys: Sequence[bytes], *, kv: bool = True, meta: bool = False) -> None:
        store = self._store
        keys = [k for k in dict.fromkeys(keys) if (kv and k not in self._kv) or (meta and k not in self._meta)]
        if not keys or self._down:
            return
        names = ([store.kv_name(k) for k in keys] if kv else []) + ([store.meta_name(k) for k in keys] if meta else [])
        try:
            values = store.io("reading chunks", lambda: store.client.mget(names))
        except StoreUnavailableError:
            self._down = True
            return
        if kv:
            self._kv.update(zip(keys, values[:len(keys)]))
        if meta:
            self._meta.update(zip(keys, values[-len(keys):]))

    def raw_kv(self, key: bytes) -> bytes | None:
        """The stored entry's bytes (unchecked), or None when absent or Redis is unreachable."""
        if key not in self._kv:
            self.prefetch([key])
        return self._kv.get(key)

    def kv(self, key: bytes, verify: bool = True):
        """As `KVReader.kv`; None also when Redis cannot be reached (the caller computes it)."""
        buf = self.raw_kv(key)
        if buf is None:
            return None
        try:
            return decode_kv(buf, verify=verify)
        except CorruptEntryError as e:
            self._store.damage["kv"] += 1
            raise CorruptEntryError(f"stored KV for chunk {key.hex()[:16]} is unreadable: {e}") from e

    def meta(self, key: bytes) -> dict | None:
        """As `KVReader.meta`. While Redis is unreachable, the metadata this process saw last.

        Raises:
            CorruptEntryError: the stored metadata fails its checksum.
            StoreUnavailableError: Redis is unreachable and this chunk's metadata was never read here.
        """
        if key not in self._meta:
            self.prefetch([key], kv=False, meta=True)
        if self._down and key not in self._meta:
            return self._store.remembered_meta(key)
        buf = self._meta.get(key)
        if buf is None:
            return None
        try:
            meta = decode_meta(buf)
        except CorruptEntryError as e:
            self._store.damage["meta"] += 1
            raise CorruptEntryError(f"stored metadata of chunk {key.hex()[:16]} is unreadable: {e}") from e
        self._store.remember_meta(key, meta)
        return meta

    def _close(self) -> None:
        self._kv.clear()
        self._meta.clear()


class RedisStore:
    """A chunk store in Redis, with the interface and semantics of `KVStore` (see the module docstring)."""

    def __init__(self, url: str, *, readonly: bool = False, max_kv_bytes: int | None = None,
                 socket_timeout: float = 5.0):
        """Connect to the Redis at `url` (`redis://[:password@]host:port/db[?prefix=NAME]`).

        Raises:
            StoreUnavailableError: Redis cannot be reached.
            StoreError: readonly and no store was written under this prefix.
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors = (redis.ConnectionError, redis.TimeoutError)
        client_url, self.prefix = split_redis_url(url)
        self.url = url
        self.path = redacted(url)  # what messages name
        self.readonly = readonly
        # A down Redis must fail fast (the query computes instead), not retry with backoff.
        self.client = redis.Redis.from_url(client_url, socket_timeout=socket_timeout, socket_connect_timeout=2.0,
                                           retry=Retry(NoBackoff(), 0))
        p = self.prefix
        self._info, self._ids, self._sources = f"{p}:info", f"{p}:ids", f"{p}:sources"
        self._kv_prefix, self._meta_prefix, self._emb_prefix = (f"{p}:{kind}:".encode() for kind in ("kv", "meta", "emb"))
        self.max_kv_bytes = max_kv_bytes  # NOTE: not enforced here; Redis's maxmemory caps the shared tier
        self.damage: dict[str, int] = {"kv": 0, "meta": 0, "emb": 0, "repaired": 0}
        self.outages = 0  # calls that failed because Redis could not be reached
        self._down = False
        self._lock = threading.Lock()
        self._metas: OrderedDict[bytes, dict] = OrderedDict()
        self._id_keys: OrderedDict[int, bytes] = OrderedDict()
        self._failed_at = 0.0
        self._manifest: dict | None = None
        try:
            try:  # not through `io`: an unreachable Redis at open is an error to report, not an outage to log
                self.client.ping()
            except (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError) as e:
                raise StoreError(f"the Redis store {self.path} refused the connection: {e}; check the password "
                                 "in the URL (redis://:PASSWORD@host:port/db)") from e
            except self._errors as e:
                raise StoreUnavailableError(f"the Redis store {self.path} is unreachable while connecting ({e}); "
                                            "check that Redis is running and the URL is right") from e
            if readonly and self.manifest is None:
                raise StoreError(f"no store at {self.path}: run `chunkcache ingest PATH --store {self.path}` first")
        except BaseException:
            self.client.close()
            raise

    @classmethod
    def shared(cls, url: str, *, readonly: bool = False) -> "RedisStore":
        return cls(url, readonly=readonly)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "RedisStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- availability

    def io(self, what: str, fn):
        """Run one Redis call. Unreachable (or read-only after a failover): StoreUnavailableError, counted,
        logged once per outage; within _RETRY_AFTER_S of a failure, raised without trying (a host that
        drops packets would otherwise cost every call its timeout). Out of memory: DiskFullError. Any
        other Redis error: StoreError."""
        import redis

        if self._down and time.monotonic() - self._failed_at < _RETRY_AFTER_S:
            with self._lock:
                self.outages += 1
            raise StoreUnavailableError(f"the Redis store {self.path} is unreachable (retrying within "
                                        f"{_RETRY_AFTER_S:g} s) while {what}")
        try:
            out = fn()
        except (*self._errors, redis.ReadOnlyError) as e:
            with self._lock:
                self.outages += 1
                first = not self._down
                self._down = True
                self._failed_at = time.monotonic()
            if first:
                log.warning("Redis store %s is unreachable (%s): queries compute what they cannot read, writes "
                            "are skipped until it returns", self.path, e)
            raise StoreUnavailableError(f"the Redis store {self.path} is unreachable while {what} ({e}); check "
                                        "that Redis is running and the URL is right") from e
        except redis.OutOfMemoryError as e:
            raise DiskFullError(f"the Redis store {self.path} is full while {what} ({e}): raise Redis's maxmemory, "
                                "or set maxmemory-policy volatile-lru so that KV entries are evicted "
                                "(docs/SCALE-OUT.md)") from e
        except redis.RedisError as e:
            raise StoreError(f"the Redis store {self.path} refused {what}: {e}") from e
        if self._down:
            self._down = False
            log.warning("Redis store %s is reachable again", self.path)
        return out

    @property
    def available(self) -> bool:
        """Whether the last call reached Redis."""
        return not self._down

    # ---- key names

    def kv_name(self, key: bytes) -> bytes:
        return self._kv_prefix + key

    def meta_name(self, key: bytes) -> bytes:
        return self._meta_prefix + key

    def _emb_name(self, key: bytes) -> bytes:
        return self._emb_prefix + key

    def remember_meta(self, key: bytes, meta: dict) -> None:
        with self._lock:
            self._metas[key] = meta
            self._metas.move_to_end(key)
            while len(self._metas) > _META_MEMO:
                self._metas.popitem(last=False)

    def remembered_meta(self, key: bytes) -> dict:
        with self._lock:
            meta = self._metas.get(key)
        if meta is None:
            raise StoreUnavailableError(f"the Redis store {self.path} is unreachable and chunk {key.hex()[:16]}'s "
                                        "metadata was never read by this process; retry when Redis is back")
        return meta

    # ---- chunks

    def __contains__(self, key: bytes) -> bool:
        try:
            return bool(self.io("checking a chunk", lambda: self.client.exists(self.kv_name(key))))
        except StoreUnavailableError:
            return False

    def __len__(self) -> int:
        """KV entries stored (a scan: for tools, not for queries)."""
        return self.io("counting chunks", lambda: sum(1 for _ in self.client.scan_iter(
            match=self._kv_prefix + b"*", count=_BATCH)))

    def num_embeddings(self) -> int:
        return int(self.io("counting embeddings", lambda: self.client.hget(self._info, "num_emb")) or 0)

    def missing(self, keys: Sequence[bytes]) -> list[bytes]:
        """The keys with no stored KV, in order, without duplicates; all of them while Redis is unreachable."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return []
        try:
            found = self.io("checking chunks", lambda: self._pipelined(
                lambda pipe: [pipe.exists(self.kv_name(k)) for k in keys]))
        except StoreUnavailableError:
            return keys
        return [k for k, n in zip(keys, found) if not n]

    def put_chunks(self, items) -> dict[bytes, int]:
        """As `KVStore.put_chunks`: one transaction; a key already stored keeps its id; an evicted KV is
        written back under its old id. `max_kv_bytes` is not enforced (Redis's maxmemory is the cap).

        Raises:
            ValueError: a malformed item (nothing is written).
            StoreUnavailableError: Redis cannot be reached (nothing is written).
        """
        self._writable()
        parsed = [unpack_item(item, i) for i, item in enumerate(items)]
        by_key = {key: (kv, meta, emb) for key, kv, meta, emb in reversed(parsed)}  # the first item of a key wins
        keys = list(dict.fromkeys(key for key, *_ in parsed))
        if not keys:
            return {}
        encoded: dict[bytes, tuple] = {}
        meta_names = [self.meta_name(k) for k in keys]

        def write(pipe) -> dict[bytes, int]:
            info = pipe.hmget(self._info, ["next_id", "emb_dim", "num_emb"])
            next_id, emb_dim, num_emb = (int(v) if v is not None else None for v in info)
            next_id = next_id or 0
            stored = self._ids_in(keys, pipe.mget(meta_names))
            found = self._pipelined(lambda p: [(p.exists(self.kv_name(k)), p.exists(self._emb_name(k))) for k in keys])
            with_kv, with_emb = found[0::2], found[1::2]
            key_to_id: dict[bytes, int] = {}
            totals = {"kv_bytes": 0, "num_tokens": 0}
            new_embs = 0
            pipe.multi()
            for key, has_kv, has_emb in zip(keys, with_kv, with_emb):
                chunk_id, meta_ok = stored.get(key, (None, True))
                if chunk_id is not None and meta_ok and has_kv:
                    key_to_id[key] = chunk_id
                    continue
                kv, meta, emb = by_key[key]
                if key not in encoded:
                    encoded[key] = encode_item(key, kv, emb)
                kv_bytes, emb_bytes, num_payload, num_tokens, dim = encoded[key]
                if not has_kv:
                    totals["kv_bytes"] += num_payload
                    totals["num_tokens"] += num_tokens
                pipe.set(self.kv_name(key), kv_bytes, ex=KV_EXPIRE_S)
                if chunk_id is not None and meta_ok:  # its KV was evicted: metadata, embedding and id stay
                    key_to_id[key] = chunk_id
                    continue
                if chunk_id is None:
                    chunk_id, next_id = next_id, next_id + 1
                pipe.set(self.meta_name(key), meta_record(key, meta, chunk_id))
                if emb_bytes is not None:
                    emb_dim = check_emb_dim(emb_dim, dim, key)
                    pipe.set(self._emb_name(key), emb_bytes)
                    new_embs += not has_emb
                pipe.hset(self._ids, str(chunk_id), key)
                key_to_id[key] = chunk_id
            pipe.hset(self._info, "next_id", next_id)
            if emb_dim is not None:
                pipe.hset(self._info, "emb_dim", emb_dim)
            pipe.hincrby(self._info, "num_emb", new_embs)
            pipe.hincrby(self._info, "kv_bytes", totals["kv_bytes"])
            pipe.hincrby(self._info, "num_tokens", totals["num_tokens"])
            return key_to_id

        key_to_id = self.io("storing chunks", lambda: self.client.transaction(
            write, self._info, *meta_names, value_from_callable=True))
        return key_to_id

    def put_kv(self, key: bytes, kv, meta: dict) -> int:
        return self.put_chunks([(key, kv, meta, None)])[key]

    @contextlib.contextmanager
    def reader(self) -> Iterator[RedisReader]:
        reader = RedisReader(self)
        try:
            yield reader
        finally:
            reader._close()

    def get_meta(self, key: bytes) -> dict | None:
        with self.reader() as reader:
            return reader.meta(key)

    def key_for_id(self, ids: Sequence[int]) -> list[bytes | None]:
        """Chunk keys for chunk ids; while Redis is unreachable, the ids this process has seen.

        Raises:
            StoreUnavailableError: Redis is unreachable and some id was never seen here.
        """
        values = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        try:
            keys = self.io("looking up chunk ids", lambda: self.client.hmget(self._ids, [str(i) for i in values]))
        except StoreUnavailableError:
            with self._lock:
                keys = [self._id_keys.get(i) for i in values]
            if any(k is None and i >= 0 for k, i in zip(keys, values)):
                raise
            return keys
        with self._lock:
            for i, k in zip(values, keys):
                if k is not None:
                    self._id_keys[i] = k
                    self._id_keys.move_to_end(i)
            while len(self._id_keys) > _META_MEMO:
                self._id_keys.popitem(last=False)
        return keys

    def embeddings(self, since_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """As `KVStore.embeddings`: (ids, vectors) with id >= since_id, read by id range in batches."""
        next_id, _ = self.watermark()
        dim = self.io("reading embeddings", lambda: self.client.hget(self._info, "emb_dim"))
        dim = int(dim) if dim is not None else None
        ids, rows = [], []
        for lo in range(max(since_id, 0), next_id, _BATCH):
            span = list(range(lo, min(lo + _BATCH, next_id)))
            keys = self.io("reading chunk ids", lambda: self.client.hmget(self._ids, [str(i) for i in span]))
            present = [(i, k) for i, k in zip(span, keys) if k is not None]
            bufs = self.io("reading embeddings", lambda: self.client.mget([self._emb_name(k) for _, k in present])
                           if present else [])
            for (chunk_id, key), buf in zip(present, bufs):
                if buf is None:
                    continue
                try:
                    rows.append(decode_emb(buf, dim))
                except CorruptEntryError as e:
                    self.damage["emb"] += 1
                    log.warning("chunk %s left out of the index: its embedding is damaged (%s)", key.hex()[:16], e)
                    continue
                ids.append(chunk_id)
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.asarray(ids, dtype=np.int64), np.stack(rows)

    def watermark(self) -> tuple[int, int]:
        next_id, retired = self.io("reading the watermark", lambda: self.client.hmget(self._info, ["next_id", "retired"]))
        return int(next_id or 0), int(retired or 0)

    def embedding(self, key: bytes) -> np.ndarray | None:
        buf, dim = self.io("reading an embedding", lambda: self._pipelined(
            lambda p: [p.get(self._emb_name(key)), p.hget(self._info, "emb_dim")]))
        return None if buf is None else decode_emb(buf, int(dim) if dim is not None else None)

    # ---- repair, retirement and eviction

    def replace_kv(self, items) -> None:
        """As `KVStore.replace_kv`: overwrite stored chunks' KVs (keys without metadata are skipped)."""
        self._writable()
        encoded = [(key, encode_entry(key, kv)) for key, kv in items]
        if not encoded:
            return
        keys = [k for k, _ in encoded]

        def write(pipe) -> int:  # reads after WATCH: a concurrent writer (they all write P:info) forces a retry
            has_meta = self._pipelined(lambda p: [p.exists(self.meta_name(k)) for k in keys])
            old = self._kv_sizes(keys)
            todo = [(k, buf) for (k, buf), ok in zip(encoded, has_meta) if ok]
            totals = {"kv_bytes": 0, "num_tokens": 0}
            for key, buf in todo:
                if key in old:
                    totals["kv_bytes"] -= old[key][0]
                    totals["num_tokens"] -= old[key][1]
                add_sizes(totals, buf, 1)
            pipe.multi()
            for key, buf in todo:
                pipe.set(self.kv_name(key), buf, ex=KV_EXPIRE_S)
            pipe.hincrby(self._info, "kv_bytes", totals["kv_bytes"])
            pipe.hincrby(self._info, "num_tokens", totals["num_tokens"])
            return len(todo)

        done = self.io("rewriting chunks", lambda: self.client.transaction(write, self._info, value_from_callable=True))
        self.damage["repaired"] += done

    def put_embedding(self, key: bytes, emb: np.ndarray) -> None:
        self._writable()
        data = encode_emb(np.asarray(emb, dtype=np.float32))
        self.io("rewriting an embedding", lambda: self.client.set(self._emb_name(key), data))
        self.damage["repaired"] += 1

    def rewrite_meta(self, key: bytes, meta: dict) -> None:
        self._writable()
        data = encode_meta(meta)
        self.io("rewriting metadata", lambda: self.client.set(self.meta_name(key), data))

    def delete_chunks(self, keys: Sequence[bytes]) -> int:
        """As `KVStore.delete_chunks`: remove chunks entirely and bump the retired counter."""
        self._writable()
        keys = list(dict.fromkeys(keys))
        if not keys:
            return 0

        def delete(pipe) -> int:  # reads after WATCH: a concurrent writer (they all write P:info) forces a retry
            metas = self._pipelined(lambda p: p.mget([self.meta_name(k) for k in keys]))[0]
            ids = self._ids_in(keys, metas)
            # Keys without intact metadata: their id rows are found by a scan of the id table (orphans too).
            unknown = {k for k in keys if not ids.get(k, (None, False))[1]}
            by_scan = self._scan_ids(unknown) if unknown else {}
            sizes = self._kv_sizes(keys)
            present = self._pipelined(lambda p: [
                (p.exists(self.kv_name(k), self.meta_name(k), self._emb_name(k)), p.exists(self._emb_name(k)))
                for k in keys])
            found = sum(1 for n in present[0::2] if n)
            pipe.multi()
            for key in keys:
                pipe.delete(self.kv_name(key), self.meta_name(key), self._emb_name(key))
                chunk_ids = set(by_scan.get(key, [])) | ({ids[key][0]} if key in ids and ids[key][1] else set())
                if chunk_ids:
                    pipe.hdel(self._ids, *[str(i) for i in chunk_ids])
            pipe.hincrby(self._info, "retired", found)
            pipe.hincrby(self._info, "num_emb", -sum(present[1::2]))
            pipe.hincrby(self._info, "kv_bytes", -sum(s[0] for s in sizes.values()))
            pipe.hincrby(self._info, "num_tokens", -sum(s[1] for s in sizes.values()))
            return found

        found = self.io("deleting chunks", lambda: self.client.transaction(delete, self._info, value_from_callable=True))
        with self._lock:
            for key in keys:
                self._metas.pop(key, None)
        return found

    def touch(self, keys: Sequence[bytes]) -> None:
        """Nothing to record: Redis keeps its own LRU clock on every read."""

    def kv_bytes(self) -> int:
        return int(self.io("reading totals", lambda: self.client.hget(self._info, "kv_bytes")) or 0)

    def evict_to(self, max_bytes: int, *, protect=()) -> tuple[int, int]:
        raise StoreError(f"{self.path} is a Redis store: Redis caps it itself. Set `maxmemory` and "
                         "`maxmemory-policy volatile-lru` on the server (store/README.md, 'Redis')")

    def scan(self, verify: bool = True) -> dict[str, list[bytes]]:
        """As `KVStore.scan`: check every stored entry (the whole store is read once, in batches)."""
        found: dict[str, list[bytes]] = {"kv": [], "meta": [], "emb": [], "legacy": [], "orphan_ids": []}
        dim = self.io("reading totals", lambda: self.client.hget(self._info, "emb_dim"))
        dim = int(dim) if dim is not None else None
        names = self.io("listing chunks", lambda: list(self.client.scan_iter(match=self._meta_prefix + b"*",
                                                                              count=_BATCH)))
        keys = list(dict.fromkeys(n[len(self._meta_prefix):] for n in names))  # SCAN may return a key twice
        for lo in range(0, len(keys), _BATCH):
            batch = keys[lo:lo + _BATCH]
            values = self.io("reading chunks", lambda: self._pipelined(lambda p: [
                p.mget([self.meta_name(k) for k in batch]),
                p.mget([self.kv_name(k) for k in batch]) if verify else p.echo(b""),
                p.mget([self._emb_name(k) for k in batch])]))
            kvs = values[1] if verify else [None] * len(batch)
            for key, meta, kv, emb in zip(batch, values[0], kvs, values[2]):
                check_record(found, key, meta, kv, emb, dim)
        known = set(keys)
        unknown = list(dict.fromkeys(key for _id, key in self.io("reading ids", lambda: list(
            self.client.hscan_iter(self._ids, count=_BATCH))) if key not in known))
        if unknown:  # written since the metadata scan, or truly orphaned: look again
            again = self.io("reading metadata", lambda: self._pipelined(
                lambda p: [p.exists(self.meta_name(k)) for k in unknown]))
            found["orphan_ids"] = [k for k, n in zip(unknown, again) if not n]
        return found

    # ---- per-tenant document writes

    def document_bytes(self, namespace: str) -> int:
        return int(self.io("reading a quota", lambda: self.client.hget(self._info, _doc_field(namespace))) or 0)

    def charge_documents(self, namespace: str, costs: Sequence[int], quota: int | None) -> list[bool]:
        """As `KVStore.charge_documents`: the check and the charge are one transaction across replicas."""
        self._writable()
        field = _doc_field(namespace)

        def charge(pipe) -> list[bool]:
            used = int(pipe.hget(self._info, field) or 0)
            granted = []
            for cost in costs:
                granted.append(quota is None or used + cost <= quota)
                used += cost if granted[-1] else 0
            pipe.multi()
            pipe.hset(self._info, field, used)
            return granted

        return self.io("charging a quota", lambda: self.client.transaction(charge, self._info, value_from_callable=True))

    # ---- sources and manifest

    def get_source(self, path: str) -> dict | None:
        buf = self.io("reading a source record", lambda: self.client.hget(self._sources, path))
        return None if buf is None else json.loads(buf)

    def put_source(self, path: str, record: dict) -> None:
        self._writable()
        data = json.dumps(record, ensure_ascii=False)
        self.io("writing a source record", lambda: self.client.hset(self._sources, path, data))

    def delete_source(self, path: str) -> None:
        self._writable()
        self.io("deleting a source record", lambda: self.client.hdel(self._sources, path))

    def sources(self) -> dict[str, dict]:
        records = self.io("reading source records", lambda: self.client.hgetall(self._sources))
        return {k.decode("utf-8"): json.loads(v) for k, v in records.items()}

    @property
    def manifest(self) -> dict | None:
        """The manifest; while Redis is unreachable, the one read last."""
        try:
            buf = self.io("reading the manifest", lambda: self.client.hget(self._info, "manifest"))
        except StoreUnavailableError:
            if self._manifest is None:
                raise
            return self._manifest
        self._manifest = None if buf is None else json.loads(buf)
        return self._manifest

    def write_manifest(self, manifest: dict) -> None:
        self._writable()
        data = json.dumps(manifest, ensure_ascii=False)
        self.io("writing the manifest", lambda: self.client.hset(self._info, "manifest", data))
        self._manifest = manifest

    def stats(self) -> dict:
        info = self.io("reading totals", lambda: self.client.hmget(self._info, ["kv_bytes", "num_tokens"]))
        kv_bytes, num_tokens = (int(v or 0) for v in info)
        memory = self.io("reading server info", lambda: self.client.info("memory"))
        return {
            "num_chunks": len(self),
            "kv_bytes": kv_bytes,
            "num_tokens": num_tokens,
            "bytes_per_token": kv_bytes / num_tokens if num_tokens else 0.0,
            "redis_used_memory": memory.get("used_memory"),
            "redis_maxmemory": memory.get("maxmemory"),
            "redis_maxmemory_policy": memory.get("maxmemory_policy"),
        }

    # ---- helpers

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the store at {self.path} was opened readonly; open it without readonly to write")

    def _pipelined(self, fill, *, transaction: bool = False) -> list:
        pipe = self.client.pipeline(transaction=transaction)
        fill(pipe)
        return pipe.execute()

    def _ids_in(self, keys: Sequence[bytes], metas: Sequence[bytes | None]) -> dict[bytes, tuple[int | None, bool]]:
        """key -> (its id, whether its metadata is intact) for the keys with metadata; a damaged record's
        id is looked up in the id table."""
        out, damaged = {}, []
        for key, buf in zip(keys, metas):
            if buf is None:
                continue
            try:
                out[key] = (decode_meta(buf)["id"], True)
            except (CorruptEntryError, KeyError):
                self.damage["meta"] += 1
                damaged.append(key)
        for key, chunk_ids in (self._scan_ids(set(damaged)) if damaged else {}).items():
            out[key] = (chunk_ids[0], False)
        for key in damaged:
            out.setdefault(key, (None, False))
        return out

    def _scan_ids(self, keys: set[bytes]) -> dict[bytes, list[int]]:
        out: dict[bytes, list[int]] = {}
        for chunk_id, key in self.client.hscan_iter(self._ids, count=_BATCH):
            if key in keys:
                out.setdefault(key, []).append(int(chunk_id))
        return out

    def _kv_sizes(self, keys: Sequence[bytes]) -> dict[bytes, tuple[int, int]]:
        """(payload bytes, tokens) of the stored KV entries among `keys`, from their headers and lengths."""
        values = self.io("reading entry sizes", lambda: self._pipelined(lambda p: [
            (p.strlen(self.kv_name(k)), p.getrange(self.kv_name(k), 0, _HEADER_BYTES - 1)) for k in keys]))
        out = {}
        for key, total, head in zip(keys, values[0::2], values[1::2]):
            sizes = entry_sizes(head) if total else None
            if total:
                out[key] = (total - (len(head) - sizes[0]), sizes[1]) if sizes else (max(total - _HEADER_BYTES, 0), 0)
        return out


def _doc_field(namespace: str) -> str:
    return "document_bytes/" + namespace


def wait_for_redis(url: str, seconds: float = 10.0) -> None:
    """Block until the Redis at `url` answers (for scripts that start one), or raise StoreUnavailableError."""
    import redis

    client = redis.Redis.from_url(split_redis_url(url)[0], socket_connect_timeout=1.0)
    deadline = time.monotonic() + seconds
    try:
        while True:
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(f"Redis at {redacted(url)} did not answer within {seconds} s: {e}") from e
                time.sleep(0.05)
    finally:
        client.close()
