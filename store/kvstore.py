"""LMDB-backed store of chunk KV caches, their metadata and embeddings (the source of truth).

On-disk layout: see store/README.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import lmdb
import numpy as np
import torch

from .codec import decode_kv, entry_sizes
from .errors import CorruptEntryError, DiskFullError, StoreError
from .eviction import EntryStats, choose_victims
from .lmdbfile import check_data_file
from .items import add_sizes, check_emb_dim, check_record, encode_entry, encode_item, encoded_sizes, meta_record, unpack_item
from .records import decode_emb, decode_meta, encode_emb, encode_meta

log = logging.getLogger(__name__)

DB_NAMES = ("info", "kv", "meta", "emb", "ids", "sources", "usage")
# Sub-databases added after the first release: a store written before them opens readonly without them.
_OPTIONAL_DBS = ("usage",)
_MAX_READERS = 1024
_MAX_MAP_BYTES = 1 << 46  # 64 TiB: growth beyond this means something is wrong, not a big corpus
_ID = struct.Struct(">q")  # big-endian so LMDB's byte order is id order
_NEXT_ID = b"next_id"
_TOTALS = b"totals"
_EMB_DIM = b"emb_dim"
_MANIFEST = b"manifest"
_DOCUMENT_BYTES = b"document_bytes/"  # + namespace: KV bytes written for that tenant's request documents
_RETIRED = b"retired"  # count of chunks removed from retrieval: other processes rebuild their index when it moves
_USAGE = struct.Struct("<dI")  # last used (seconds since the epoch), uses
_LOW_DISK_BYTES = 16 << 20  # LMDB reports a short write on a full disk as EIO; this much free space means "full"
_USAGE_FLUSH_S = 60.0  # buffered hit counts reach the store with the next write, or after this long
EVICT_TO_FRACTION = 0.9  # eviction at the cap frees this much below it


class KVReader:
    """Reads inside one LMDB read transaction; values are views into the memory map (no copies)."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict, on_damage=None):
        self._txn = txn
        self._dbs = dbs
        self._on_damage = on_damage or (lambda kind: None)

    def kv(self, key: bytes, verify: bool = True) -> torch.Tensor | None:
        """The stored KV of one chunk, as a view over the memory map.

        Args:
            key: chunk key (from `chunk_key`).
            verify: check the entry's crc32.

        Returns:
            [2, layers, kv_heads, tokens, head_dim] tensor valid only inside the `with store.reader()` block
            (copy it out, e.g. `dst.copy_(kv)`), or None if the key is not stored. An int8 entry comes back
            dequantized into a new float32 tensor (not a view).

        Raises:
            CorruptEntryError: the stored bytes are damaged or from another format version.
        """
        buf = self._get(key, "kv")
        if buf is None:
            return None
        try:
            return decode_kv(buf, verify=verify)
        except CorruptEntryError as e:
            self._on_damage("kv")
            raise CorruptEntryError(
                f"stored KV for chunk {key.hex()[:16]} is unreadable: {e}"
            ) from e

    def meta(self, key: bytes) -> dict | None:
        """The chunk's metadata dict (source, offsets, text, num_tokens, id, ...), or None if absent.

        Raises:
            CorruptEntryError: the stored metadata fails its checksum.
        """
        buf = self._get(key, "meta")
        if buf is None:
            return None
        try:
            return decode_meta(buf)
        except CorruptEntryError as e:
            self._on_damage("meta")
            raise CorruptEntryError(f"stored metadata of chunk {key.hex()[:16]} is unreadable: {e}") from e

    def prefetch(self, keys: Sequence[bytes], *, kv: bool = True, meta: bool = False) -> None:
        """Nothing to do for LMDB (reads are memory-mapped); a remote store reads these in one round trip."""

    def raw_kv(self, key: bytes):
        """The stored entry's bytes, unchecked (a view valid inside the block), or None: for copying stores."""
        return self._get(key, "kv")

    def _get(self, key: bytes, db: str):
        if self._txn is None:
            raise StoreError("KVReader used after its `with store.reader()` block ended; read inside the block")
        return self._txn.get(key, db=self._dbs[db])

    def _close(self) -> None:
        self._txn = None


# LMDB allows one open environment per file per process (a second one's locks would be released when either
# closes): `KVStore.shared` hands every opener in a process the same KVStore, reference-counted.
_SHARED: dict[str, "KVStore"] = {}
_SHARED_LOCK = threading.Lock()


class KVStore:
    """The chunk store: one LMDB environment at `path/kv.lmdb` with named sub-databases.

    One writer and many readers, across threads and processes. NOTE: an LMDB environment must not cross a
    fork(): create the KVStore in each process after forking (e.g. in a worker's init), never inherit one.
    The memory map grows on demand (doubling) when a write fills it.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, map_size: int = 1 << 30,
                 max_kv_bytes: int | None = None):
        """Open (or, unless readonly, create) the store.

        Args:
            path: store directory; the LMDB environment lives in `path/kv.lmdb/`.
            readonly: open for reading only; the store must exist.
            map_size: initial memory-map size in bytes (grows automatically on writes).
            max_kv_bytes: cap on the KV payload bytes; writes past it evict KV entries (see store/eviction.py).
                None: no cap.

        Raises:
            DamagedStoreError: data.mdb is truncated or foreign (checked before LMDB maps it).
            StoreError: readonly and no store exists, or LMDB cannot open it.
        """
        self.path = Path(path)
        self.readonly = readonly
        self._env_path = self.path / "kv.lmdb"
        self._refs = 1
        self._shared_key: str | None = None
        if readonly and not (self._env_path / "data.mdb").is_file():
            raise StoreError(f"no store at {self.path}: run `chunkcache ingest PATH --store {self.path}` first")
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        check_data_file(self._env_path / "data.mdb")
        try:
            self._env = lmdb.open(
                str(self._env_path), subdir=True, map_size=map_size, readonly=readonly,
                max_dbs=len(DB_NAMES), lock=True, max_readers=_MAX_READERS,
            )
        except lmdb.Error as e:
            raise StoreError(f"cannot open the store at {self._env_path}: {e}; check the path and permissions") from e
        self._pid = os.getpid()
        # Remapping (map growth) with a live read txn would leave its views dangling: growth waits for readers.
        self._cv = threading.Condition()
        self._num_reads = 0
        self._growing = False
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.max_kv_bytes = max_kv_bytes
        # Damaged entries seen by this process, by kind ("kv", "meta", "emb"), and how many were rewritten.
        self.damage: dict[str, int] = {"kv": 0, "meta": 0, "emb": 0, "repaired": 0}
        self._usage: dict[bytes, tuple[float, int]] = {}  # key -> (last used, new uses), not yet written
        self._usage_since = time.time()
        self._dbs = self._open_dbs()

    # ---- lifecycle

    @classmethod
    def shared(cls, path: str | os.PathLike, *, readonly: bool = False) -> "KVStore":
        """This process's KVStore for `path`: opened on first use, then the same object for every opener
        (reference-counted: each `close()` releases one reference, the last closes the environment). A store
        open read-only here is not upgraded: opening it for writing meanwhile is refused."""
        key = os.path.realpath(Path(path) / "kv.lmdb")
        with _SHARED_LOCK:
            store = _SHARED.get(key)
            if store is not None and store._pid == os.getpid() and store._refs > 0:
                if store.readonly and not readonly:
                    raise StoreError(f"the store at {path} is open read-only in this process; close it before "
                                     "opening it for writing")
                store._refs += 1
                return store
            store = cls(path, readonly=readonly)
            store._shared_key = key
            _SHARED[key] = store
            return store

    def close(self) -> None:
        """Close the environment (writing buffered usage first); unusable afterwards. Safe to call twice.
        A shared store (`KVStore.shared`) closes when its last holder closes it."""
        with _SHARED_LOCK:  # held until the environment is closed: no opener may slip in a second one meanwhile
            if self._refs > 1:
                self._refs -= 1
                return
            self._refs = 0
            if self._shared_key is not None and _SHARED.get(self._shared_key) is self:
                del _SHARED[self._shared_key]
            if self._usage and not self.readonly and os.getpid() == self._pid:
                self._flush_usage_best_effort()
            self._env.close()

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- chunks

    def __contains__(self, key: bytes) -> bool:
        with self._read_txn(buffers=True) as txn:
            return txn.get(key, db=self._dbs["kv"]) is not None

    def __len__(self) -> int:
        with self._read_txn() as txn:
            return txn.stat(self._dbs["kv"])["entries"]

    def num_embeddings(self) -> int:
        """How many chunks have an embedding (what a complete index holds), without reading them."""
        with self._read_txn() as txn:
            return txn.stat(self._dbs["emb"])["entries"]

    def missing(self, keys: Sequence[bytes]) -> list[bytes]:
        """The keys not yet stored, in the given order, without duplicates (one read transaction).

        Args:
            keys: chunk keys.

        Returns:
            the subset of `keys` with no stored KV.
        """
        with self._read_txn(buffers=True) as txn:
            return [k for k in dict.fromkeys(keys) if txn.get(k, db=self._dbs["kv"]) is None]

    def put_chunks(self, items: Sequence[tuple[bytes, torch.Tensor, dict, np.ndarray | None]]) -> dict[bytes, int]:
        """Store chunks atomically (one write transaction); keys already stored are left untouched, except
        that a chunk whose KV was evicted gets it back (keeping its id, metadata and embedding).

        Over `max_kv_bytes` afterwards, other chunks' KVs are evicted (never those just written).

        Args:
            items: (key, kv [2, layers, kv_heads, tokens, head_dim] (a tensor, a QuantizedKV for int8, or an
                encoded entry's bytes copied from another store),
                meta (JSON-serializable dict), embedding float32 [dim] or None) per chunk.

        Returns:
            key -> int64 chunk id for every item (new ids are sequential; existing keys keep theirs).

        Raises:
            ValueError: a malformed item (nothing is written).
            StoreError: the write failed (DiskFullError: disk full); the store is unchanged.
        """
        items = list(items)
        now = time.time()
        # Encoded once and kept across map-growth retries.
        encoded: dict[bytes, tuple[bytes, bytes | None, int, int, int]] = {}

        def write(txn: lmdb.Transaction) -> dict[bytes, int]:
            key_to_id: dict[bytes, int] = {}
            next_id = self._next_id(txn)
            totals = self._totals(txn)
            emb_dim = _int_or_none(txn.get(_EMB_DIM, db=self._dbs["info"]))
            for index, item in enumerate(items):
                key, kv, meta, emb = unpack_item(item, index)
                if key in key_to_id:
                    continue
                stored_id, meta_ok = self._stored_id(txn, key)
                old_kv = txn.get(key, db=self._dbs["kv"])
                if stored_id is not None and meta_ok and old_kv is not None:
                    key_to_id[key] = stored_id
                    continue
                if key not in encoded:
                    encoded[key] = encode_item(key, kv, emb)
                kv_bytes, emb_bytes, num_payload, num_tokens, dim = encoded[key]
                if old_kv is not None:  # rewritten (its metadata was damaged): count it once
                    add_sizes(totals, old_kv, -1)
                totals["kv_bytes"] += num_payload
                totals["num_tokens"] += num_tokens
                txn.put(key, kv_bytes, db=self._dbs["kv"])
                self._put_usage(txn, key, now, 0)
                if stored_id is not None and meta_ok:  # its KV was evicted: metadata, embedding, id stay
                    key_to_id[key] = stored_id
                    continue
                if emb_bytes is not None:
                    emb_dim = check_emb_dim(emb_dim, dim, key)
                chunk_id = next_id if stored_id is None else stored_id
                txn.put(key, meta_record(key, meta, chunk_id), db=self._dbs["meta"])
                if emb_bytes is not None:
                    txn.put(key, emb_bytes, db=self._dbs["emb"])
                txn.put(_ID.pack(chunk_id), key, db=self._dbs["ids"])
                key_to_id[key] = chunk_id
                if stored_id is None:
                    next_id += 1
            self._write_usage(txn)
            self._enforce_cap(txn, totals, protect=key_to_id)
            txn.put(_NEXT_ID, _ID.pack(next_id), db=self._dbs["info"])
            txn.put(_TOTALS, json.dumps(totals).encode(), db=self._dbs["info"])
            if emb_dim is not None:
                txn.put(_EMB_DIM, str(emb_dim).encode(), db=self._dbs["info"])
            return key_to_id

        key_to_id = self._write(write)
        self._usage.clear()
        self._usage_since = now
        return key_to_id

    def put_kv(self, key: bytes, kv: torch.Tensor, meta: dict) -> int:
        """Store one chunk without an embedding (same semantics as `put_chunks`).

        Returns:
            the chunk's id (the existing one if the key was already stored).
        """
        return self.put_chunks([(key, kv, meta, None)])[key]

    @contextlib.contextmanager
    def reader(self) -> Iterator[KVReader]:
        """One read transaction whose KV tensors are views into the memory map.

        Returns (yields):
            a KVReader; its tensors are valid only inside the with-block: copy out what you keep.
        """
        with self._read_txn(buffers=True) as txn:
            kv_reader = KVReader(txn, self._dbs, self._count_damage)
            try:
                yield kv_reader
            finally:
                kv_reader._close()

    def get_meta(self, key: bytes) -> dict | None:
        """The chunk's metadata dict, or None if the key is not stored.

        Raises:
            CorruptEntryError: the stored metadata fails its checksum.
        """
        with self.reader() as reader:
            return reader.meta(key)

    def key_for_id(self, ids: Sequence[int]) -> list[bytes | None]:
        """Chunk keys for chunk ids (e.g. Faiss search results).

        Args:
            ids: int64 chunk ids (a list or numpy array).

        Returns:
            one key per id, None where the id is unknown (e.g. -1).
        """
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        with self._read_txn() as txn:
            return [txn.get(_ID.pack(i), db=self._dbs["ids"]) for i in values]

    def embeddings(self, since_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Stored (id, embedding) pairs with id >= since_id, in id order, for building or extending the index.

        A damaged embedding is left out (logged and counted in `damage`; `chunkcache verify --repair`
        recomputes it), so one bad row never stops retrieval.

        Returns:
            ids int64 [n], embeddings float32 [n, dim] (shape [0, 0] when none are stored).
        """
        ids, rows = [], []
        with self._read_txn() as txn:
            emb_db = self._dbs["emb"]
            dim = _int_or_none(txn.get(_EMB_DIM, db=self._dbs["info"]))
            cursor = txn.cursor(db=self._dbs["ids"])
            if not cursor.set_range(_ID.pack(max(since_id, 0))):
                cursor = iter(())
            for id_bytes, key in cursor:
                emb = txn.get(key, db=emb_db)
                if emb is None:
                    continue
                try:
                    rows.append(decode_emb(emb, dim))
                except CorruptEntryError as e:
                    self._count_damage("emb")
                    log.warning("chunk %s left out of the index: its embedding is damaged (%s)", key.hex()[:16], e)
                    continue
                ids.append(_ID.unpack(id_bytes)[0])
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.asarray(ids, dtype=np.int64), np.stack(rows)

    def watermark(self) -> tuple[int, int]:
        """(next chunk id, chunks retired so far): when either moves, the retrievable set has changed.

        One small read: cheap enough to check before every query.
        """
        with self._read_txn() as txn:
            return self._next_id(txn), _int_or_none(txn.get(_RETIRED, db=self._dbs["info"])) or 0

    def embedding(self, key: bytes) -> np.ndarray | None:
        """One chunk's embedding float32 [dim], or None if it has none.

        Raises:
            CorruptEntryError: the stored embedding fails its checksum.
        """
        with self._read_txn() as txn:
            buf = txn.get(key, db=self._dbs["emb"])
            dim = _int_or_none(txn.get(_EMB_DIM, db=self._dbs["info"]))
        return None if buf is None else decode_emb(buf, dim)

    # ---- repair, retirement and eviction

    def replace_kv(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        """Overwrite the KV of chunks already stored (a damaged entry recomputed), keeping their metadata.

        Args:
            items: (key, kv [2, layers, kv_heads, tokens, head_dim]) per chunk; keys without metadata are skipped.
        """
        encoded = [(key, buf, *encoded_sizes(buf)) for key, buf in ((key, encode_entry(key, kv)) for key, kv in items)]
        now = time.time()

        def write(txn: lmdb.Transaction) -> int:
            totals = self._totals(txn)
            done = 0
            for key, kv_bytes, num_payload, num_tokens in encoded:
                if txn.get(key, db=self._dbs["meta"]) is None:
                    continue
                old = txn.get(key, db=self._dbs["kv"])
                if old is not None:
                    add_sizes(totals, old, -1)
                txn.put(key, kv_bytes, db=self._dbs["kv"])
                self._put_usage(txn, key, now, 0)
                totals["kv_bytes"] += num_payload
                totals["num_tokens"] += num_tokens
                done += 1
            self._enforce_cap(txn, totals, protect={key for key, *_ in encoded})
            txn.put(_TOTALS, json.dumps(totals).encode(), db=self._dbs["info"])
            return done

        self.damage["repaired"] += self._write(write)

    def put_embedding(self, key: bytes, emb: np.ndarray) -> None:
        """Overwrite a stored chunk's embedding (a damaged one recomputed), keeping its id."""
        data = encode_emb(np.asarray(emb, dtype=np.float32))
        self._write(lambda txn: txn.put(key, data, db=self._dbs["emb"]))
        self.damage["repaired"] += 1

    def rewrite_meta(self, key: bytes, meta: dict) -> None:
        """Overwrite a chunk's metadata as given (e.g. to add a checksum to a value written before them)."""
        data = encode_meta(meta)
        self._write(lambda txn: txn.put(key, data, db=self._dbs["meta"]))

    def delete_chunks(self, keys: Sequence[bytes]) -> int:
        """Remove chunks entirely (KV, metadata, embedding, id), e.g. those of a source that was edited.

        Bumps the retired counter of `watermark()`, so every process rebuilds its index without them.

        Returns:
            how many of the keys were stored.
        """
        keys = list(dict.fromkeys(keys))

        def write(txn: lmdb.Transaction) -> int:
            totals = self._totals(txn)
            found = 0
            ids_of = self._ids_of(txn, keys)
            for key in keys:
                kv = txn.get(key, db=self._dbs["kv"])
                if kv is not None:
                    add_sizes(totals, kv, -1)
                present = [txn.delete(key, db=self._dbs[db]) for db in ("kv", "meta", "emb")]
                if self._dbs.get("usage") is not None:
                    txn.delete(key, db=self._dbs["usage"])
                for chunk_id in ids_of.get(key, ()):
                    txn.delete(_ID.pack(chunk_id), db=self._dbs["ids"])
                found += any(present)
            retired = (_int_or_none(txn.get(_RETIRED, db=self._dbs["info"])) or 0) + found
            txn.put(_RETIRED, str(retired).encode(), db=self._dbs["info"])
            txn.put(_TOTALS, json.dumps(totals).encode(), db=self._dbs["info"])
            return found

        return self._write(write) if keys else 0

    def touch(self, keys: Sequence[bytes]) -> None:
        """Note that these chunks' KVs were just read (eviction keeps used entries longer).

        Buffered in memory and written with the next write, so a query that hits every chunk writes nothing;
        after `_USAGE_FLUSH_S` the buffer is written on its own (best effort: a full disk only logs).
        """
        now = time.time()
        for key in keys:
            _, uses = self._usage.get(key, (now, 0))
            self._usage[key] = (now, uses + 1)
        if not self.readonly and now - self._usage_since > _USAGE_FLUSH_S:
            self._flush_usage_best_effort()

    def kv_bytes(self) -> int:
        """KV payload bytes stored: what `max_kv_bytes` caps."""
        with self._read_txn() as txn:
            return self._totals(txn)["kv_bytes"]

    def evict_to(self, max_bytes: int, *, protect=()) -> tuple[int, int]:
        """Drop KV entries (never metadata or embeddings) until the KV payload is at most `max_bytes`.

        Args:
            max_bytes: target KV payload bytes.
            protect: keys not to evict (e.g. those a request is about to read).

        Returns:
            (entries evicted, payload bytes freed).
        """
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if self.kv_bytes() <= max_bytes:
            return 0, 0
        self._flush_usage_best_effort()
        protect = set(protect)

        def write(txn: lmdb.Transaction) -> tuple[int, int]:
            totals = self._totals(txn)
            result = self._evict_in(txn, totals, max_bytes, protect)
            txn.put(_TOTALS, json.dumps(totals).encode(), db=self._dbs["info"])
            return result

        return self._write(write)

    def _evict_in(self, txn: lmdb.Transaction, totals: dict, max_bytes: int, protect) -> tuple[int, int]:
        """Evict inside `txn` (updating `totals`, which the caller writes) down to `max_bytes`."""
        entries = [e for e in self._entry_stats(txn) if e.key not in protect]
        victims = choose_victims(entries, totals["kv_bytes"], max_bytes, time.time())
        freed = 0
        for entry in victims:
            add_sizes(totals, txn.get(entry.key, db=self._dbs["kv"]), -1)
            freed += entry.num_bytes
            txn.delete(entry.key, db=self._dbs["kv"])
        if victims:
            log.info("evicted %d KV entries (%d bytes) to stay under %d bytes", len(victims), freed, max_bytes)
        return len(victims), freed

    def _enforce_cap(self, txn: lmdb.Transaction, totals: dict, protect) -> None:
        """Over `max_kv_bytes`, evict down to EVICT_TO_FRACTION of it, in the same transaction as the write
        (a kill between the two cannot leave the store over its cap). Going below the cap means one scan of
        the entries frees room for many writes, instead of a scan per write at the cap."""
        if self.max_kv_bytes is not None and totals["kv_bytes"] > self.max_kv_bytes:
            self._evict_in(txn, totals, int(self.max_kv_bytes * EVICT_TO_FRACTION), set(protect))

    def scan(self, verify: bool = True) -> dict[str, list[bytes]]:
        """Check every stored entry's checksum (the whole store is read once).

        Returns:
            {"kv": keys whose KV is damaged, "meta": keys whose metadata is damaged, "emb": keys whose
             embedding is damaged, "legacy": keys whose metadata or embedding predates checksums,
             "orphan_ids": keys named by the id table without metadata}.
        """
        found: dict[str, list[bytes]] = {"kv": [], "meta": [], "emb": [], "legacy": [], "orphan_ids": []}
        with self._read_txn(buffers=True) as txn:
            dim = _int_or_none(txn.get(_EMB_DIM, db=self._dbs["info"]))
            for key, meta in txn.cursor(db=self._dbs["meta"]):
                key = bytes(key)
                kv = txn.get(key, db=self._dbs["kv"]) if verify else None
                check_record(found, key, meta, kv, txn.get(key, db=self._dbs["emb"]), dim)
            for _id, key in txn.cursor(db=self._dbs["ids"]):
                if txn.get(bytes(key), db=self._dbs["meta"]) is None:
                    found["orphan_ids"].append(bytes(key))
        return found

    # ---- per-tenant document writes (chunkcache/accounting.py)

    def document_bytes(self, namespace: str) -> int:
        """KV bytes charged so far to `namespace` for chunks written from request `documents`."""
        with self._read_txn() as txn:
            buf = txn.get(_DOCUMENT_BYTES + namespace.encode("utf-8"), db=self._dbs["info"])
        return 0 if buf is None else int(bytes(buf))

    def charge_documents(self, namespace: str, costs: Sequence[int], quota: int | None) -> list[bool]:
        """Charge `namespace` for each cost in turn while its total stays within `quota` (None: no limit).

        The check and the charge are one write transaction, so processes sharing the store cannot both
        spend the same remaining quota. A charge is made before the chunk is written (a failed write stays
        charged: the quota errs towards writing less).

        Returns:
            per cost, whether it was charged (False: it would exceed the quota; compute it without storing).
        """
        key = _DOCUMENT_BYTES + namespace.encode("utf-8")

        def write(txn: lmdb.Transaction) -> list[bool]:
            buf = txn.get(key, db=self._dbs["info"])
            used = 0 if buf is None else int(bytes(buf))
            granted = []
            for cost in costs:
                granted.append(quota is None or used + cost <= quota)
                used += cost if granted[-1] else 0
            txn.put(key, str(used).encode(), db=self._dbs["info"])
            return granted

        return self._write(write)

    # ---- sources and manifest

    def get_source(self, path: str) -> dict | None:
        """The ingest record of one source file, or None."""
        with self._read_txn() as txn:
            buf = txn.get(path.encode("utf-8"), db=self._dbs["sources"])
        return None if buf is None else json.loads(buf)

    def put_source(self, path: str, record: dict) -> None:
        """Store (replace) the ingest record of one source file.

        Args:
            path: the source's path as given to ingest.
            record: JSON-serializable dict (e.g. content hash, chunk keys, mtime).
        """
        data = json.dumps(record, ensure_ascii=False).encode("utf-8")
        self._write(lambda txn: txn.put(path.encode("utf-8"), data, db=self._dbs["sources"]))

    def delete_source(self, path: str) -> None:
        """Forget the ingest record of one source file (its chunks are removed with `delete_chunks`)."""
        self._write(lambda txn: txn.delete(path.encode("utf-8"), db=self._dbs["sources"]))

    def sources(self) -> dict[str, dict]:
        """All source records: path -> record."""
        with self._read_txn() as txn:
            return {k.decode("utf-8"): json.loads(v) for k, v in txn.cursor(db=self._dbs["sources"])}

    @property
    def manifest(self) -> dict | None:
        """The store's manifest (model, prefix, chunking and index settings), or None if never written."""
        with self._read_txn() as txn:
            buf = txn.get(_MANIFEST, db=self._dbs["info"])
        return None if buf is None else json.loads(buf)

    def write_manifest(self, manifest: dict) -> None:
        """Replace the manifest.

        Args:
            manifest: JSON-serializable dict.
        """
        data = json.dumps(manifest, ensure_ascii=False).encode("utf-8")
        self._write(lambda txn: txn.put(_MANIFEST, data, db=self._dbs["info"]))

    def stats(self) -> dict:
        """Size figures of the store.

        Returns:
            dict with num_chunks, kv_bytes (tensor payload bytes), num_tokens, bytes_per_token, map_size,
            file_bytes (size of data.mdb) and disk_bytes (blocks actually allocated on disk).
        """
        with self._read_txn() as txn:
            num_chunks = txn.stat(self._dbs["kv"])["entries"]
            totals = self._totals(txn)
        data_file = os.stat(self._env_path / "data.mdb")
        return {
            "num_chunks": num_chunks,
            "kv_bytes": totals["kv_bytes"],
            "num_tokens": totals["num_tokens"],
            "bytes_per_token": totals["kv_bytes"] / totals["num_tokens"] if totals["num_tokens"] else 0.0,
            "map_size": self._env.info()["map_size"],
            "file_bytes": data_file.st_size,
            "disk_bytes": data_file.st_blocks * 512,
        }

    # ---- transactions

    def _open_dbs(self) -> dict:
        if self.readonly:
            dbs = {}
            for name in DB_NAMES:
                try:
                    dbs[name] = self._env.open_db(name.encode(), create=False)
                except lmdb.NotFoundError:
                    if name not in _OPTIONAL_DBS:
                        raise StoreError(f"the store at {self.path} is incomplete (no {name!r} table); re-run "
                                         "`chunkcache ingest` into a new store") from None
                    dbs[name] = None
                except lmdb.Error as e:
                    raise StoreError(f"the store at {self.path} cannot be read ({e}); run `chunkcache verify "
                                     "--store ...` or re-run `chunkcache ingest` into a new store") from e
            return dbs
        return self._write(lambda txn: {name: self._env.open_db(name.encode(), txn=txn) for name in DB_NAMES})

    def _count_damage(self, kind: str) -> None:
        self.damage[kind] += 1

    def _stored_id(self, txn: lmdb.Transaction, key: bytes) -> tuple[int | None, bool]:
        """(the chunk's id or None if it is not stored, whether its metadata is intact)."""
        buf = txn.get(key, db=self._dbs["meta"])
        if buf is None:
            return None, True
        try:
            return decode_meta(buf)["id"], True
        except (CorruptEntryError, KeyError):
            self._count_damage("meta")
            ids = self._ids_of(txn, [key]).get(key)
            return (ids[0] if ids else None), False

    def _ids_of(self, txn: lmdb.Transaction, keys: Sequence[bytes]) -> dict[bytes, list[int]]:
        """key -> chunk ids naming it, from the metadata (or, when that is damaged, a scan of the id table)."""
        out: dict[bytes, list[int]] = {}
        unknown = set()
        for key in keys:
            buf = txn.get(key, db=self._dbs["meta"])
            try:
                out[key] = [decode_meta(buf)["id"]]
            except (CorruptEntryError, KeyError, TypeError):  # damaged, or no metadata (an orphan id row)
                unknown.add(key)
        if unknown:
            for id_bytes, key in txn.cursor(db=self._dbs["ids"]):
                if bytes(key) in unknown:
                    out.setdefault(bytes(key), []).append(_ID.unpack(id_bytes)[0])
        return out

    def _put_usage(self, txn: lmdb.Transaction, key: bytes, last_used: float, uses: int) -> None:
        if self._dbs.get("usage") is not None:
            txn.put(key, _USAGE.pack(last_used, uses), db=self._dbs["usage"])

    def _write_usage(self, txn: lmdb.Transaction) -> None:
        """Add the buffered uses to the stored ones (keys evicted or removed meanwhile are skipped)."""
        if self._dbs.get("usage") is None:
            return
        for key, (last_used, uses) in self._usage.items():
            if txn.get(key, db=self._dbs["kv"]) is None:
                continue
            old = txn.get(key, db=self._dbs["usage"])
            stored = _USAGE.unpack(old)[1] if old is not None and len(old) == _USAGE.size else 0
            self._put_usage(txn, key, last_used, stored + uses)

    def _flush_usage_best_effort(self) -> None:
        if not self._usage:
            return
        try:
            self._write(self._write_usage)
        except StoreError as e:  # usage only orders eviction: losing it must not fail a read-only query
            log.warning("could not record chunk usage: %s", e)
        finally:
            self._usage.clear()
            self._usage_since = time.time()

    def _entry_stats(self, txn: lmdb.Transaction) -> list[EntryStats]:
        """Eviction statistics of every stored KV entry except the prompt prefix (never evicted)."""
        usage_db = self._dbs.get("usage")
        out = []
        for key, kv in txn.cursor(db=self._dbs["kv"]):
            key = bytes(key)
            sizes = entry_sizes(kv)
            num_bytes, num_tokens = sizes if sizes is not None else (len(kv), 0)
            meta_buf = txn.get(key, db=self._dbs["meta"])
            try:
                meta = decode_meta(meta_buf) if meta_buf is not None else {}
            except CorruptEntryError:
                meta = {}
            if meta.get("kind") == "prefix":
                continue
            usage = txn.get(key, db=usage_db) if usage_db is not None else None
            last_used, uses = _USAGE.unpack(usage) if usage is not None and len(usage) == _USAGE.size else (0.0, 0)
            corpus = txn.get(key, db=self._dbs["emb"]) is not None
            out.append(EntryStats(key, int(meta.get("id", -1)), num_bytes, num_tokens, corpus, last_used, uses))
        return out

    @contextlib.contextmanager
    def _read_txn(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        self._check_pid()
        while True:
            self._enter_read()
            try:
                txn = self._env.begin(buffers=buffers)
            except lmdb.MapResizedError:
                # Another process grew the map beyond ours: adopt its size, then retry.
                self._exit_read()
                self._grow(0)
                continue
            except BaseException:
                self._exit_read()
                raise
            break
        try:
            yield txn
        finally:
            txn.abort()
            self._exit_read()

    def _write(self, fn):
        """Run fn(txn) in one write transaction, growing the map and retrying when it is full."""
        if self.readonly:
            raise StoreError(f"the store at {self.path} was opened readonly; open it without readonly to write")
        self._check_pid()
        with self._write_lock:
            while True:
                try:
                    # Commits on success; aborts (nothing written) on any exception.
                    with self._env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapFullError:
                    self._grow(2 * self._env.info()["map_size"])
                except lmdb.MapResizedError:
                    self._grow(0)
                except lmdb.Error as e:
                    free = _free_bytes(self.path)
                    if _is_disk_full(e, free):
                        raise DiskFullError(
                            f"disk full: writing to the store at {self.path} failed ({e}; {free} bytes free). The "
                            "store is unchanged and queries over stored chunks keep working; free disk space, or "
                            "cap the store (`chunkcache gc --to BYTES`, max_store_bytes), and retry"
                        ) from e
                    raise StoreError(
                        f"writing to the store at {self.path} failed: {e}. The store is unchanged; "
                        "fix permissions (or free disk space) and retry"
                    ) from e

    def _grow(self, new_size: int) -> None:
        """Resize the memory map (0 = adopt the size on disk), once no read transaction is open."""
        if getattr(self._local, "num_reads", 0):
            raise StoreError(
                f"the store at {self.path} needs a larger memory map, which cannot happen while this thread is "
                "inside `store.reader()`: write outside the reader block, or open the store with a larger map_size"
            )
        if new_size > _MAX_MAP_BYTES:
            raise StoreError(f"the store at {self.path} would need a map over {_MAX_MAP_BYTES} bytes; refusing")
        with self._cv:
            self._growing = True
            try:
                self._cv.wait_for(lambda: self._num_reads == 0)
                self._env.set_mapsize(new_size)
            except lmdb.Error as e:
                raise StoreError(
                    f"cannot grow the store's map at {self.path} to {new_size} bytes: {e}. The store is unchanged; "
                    "free disk space or address space and retry"
                ) from e
            finally:
                self._growing = False
                self._cv.notify_all()

    def _enter_read(self) -> None:
        nested = getattr(self._local, "num_reads", 0)
        with self._cv:
            if not nested:  # a thread already reading must not wait for a growth that waits for it
                self._cv.wait_for(lambda: not self._growing)
            self._num_reads += 1
        self._local.num_reads = nested + 1

    def _exit_read(self) -> None:
        self._local.num_reads -= 1
        with self._cv:
            self._num_reads -= 1
            self._cv.notify_all()

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            raise StoreError(
                f"KVStore for {self.path} was opened in process {self._pid} and used after fork() in {os.getpid()}; "
                "open a new KVStore in each process after forking"
            )

    def _next_id(self, txn: lmdb.Transaction) -> int:
        buf = txn.get(_NEXT_ID, db=self._dbs["info"])
        return 0 if buf is None else _ID.unpack(buf)[0]

    def _totals(self, txn: lmdb.Transaction) -> dict:
        buf = txn.get(_TOTALS, db=self._dbs["info"])
        return {"kv_bytes": 0, "num_tokens": 0} if buf is None else json.loads(bytes(buf))


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _is_disk_full(exc: lmdb.Error, free: int) -> bool:
    """Whether a failed LMDB write means a full disk: ENOSPC, or a short write (EIO) with little space left."""
    if isinstance(exc, lmdb.DiskError) or "No space left" in str(exc):
        return True
    return "Input/output error" in str(exc) and 0 <= free < _LOW_DISK_BYTES


def _int_or_none(buf) -> int | None:
    return None if buf is None else int(bytes(buf))
