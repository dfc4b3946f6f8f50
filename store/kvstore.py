"""LMDB-backed store of chunk KV caches, their metadata and embeddings (the source of truth).

On-disk layout: see store/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from pathlib import Path
from typing import Iterator, Sequence

import lmdb
import numpy as np
import torch

from .codec import decode_kv, encode_kv
from .errors import CorruptEntryError, StoreError

DB_NAMES = ("info", "kv", "meta", "emb", "ids", "sources")
KEY_BYTES = 32
_MAX_READERS = 1024
_MAX_MAP_BYTES = 1 << 46  # 64 TiB: growth beyond this means something is wrong, not a big corpus
_ID = struct.Struct(">q")  # big-endian so LMDB's byte order is id order
_NEXT_ID = b"next_id"
_TOTALS = b"totals"
_EMB_DIM = b"emb_dim"
_MANIFEST = b"manifest"


class KVReader:
    """Reads inside one LMDB read transaction; values are views into the memory map (no copies)."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict):
        self._txn = txn
        self._dbs = dbs

    def kv(self, key: bytes, verify: bool = True) -> torch.Tensor | None:
        """The stored KV of one chunk, as a view over the memory map.

        Args:
            key: chunk key (from `chunk_key`).
            verify: check the entry's crc32.

        Returns:
            [2, layers, kv_heads, tokens, head_dim] tensor valid only inside the `with store.reader()` block
            (copy it out, e.g. `dst.copy_(kv)`), or None if the key is not stored.

        Raises:
            CorruptEntryError: the stored bytes are damaged or from another format version.
        """
        buf = self._get(key, "kv")
        if buf is None:
            return None
        try:
            return decode_kv(buf, verify=verify)
        except CorruptEntryError as e:
            raise CorruptEntryError(
                f"stored KV for chunk {key.hex()[:16]} is unreadable: {e}. Re-run `chunkcache ingest` to "
                "rewrite it (or delete the store)"
            ) from e

    def meta(self, key: bytes) -> dict | None:
        """The chunk's metadata dict (source, offsets, text, num_tokens, id, ...), or None if absent."""
        buf = self._get(key, "meta")
        return None if buf is None else json.loads(bytes(buf))

    def _get(self, key: bytes, db: str):
        if self._txn is None:
            raise StoreError("KVReader used after its `with store.reader()` block ended; read inside the block")
        return self._txn.get(key, db=self._dbs[db])

    def _close(self) -> None:
        self._txn = None


class KVStore:
    """The chunk store: one LMDB environment at `path/kv.lmdb` with named sub-databases.

    One writer and many readers, across threads and processes. NOTE: an LMDB environment must not cross a
    fork(): create the KVStore in each process after forking (e.g. in a worker's init), never inherit one.
    The memory map grows on demand (doubling) when a write fills it.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, map_size: int = 1 << 30):
        """Open (or, unless readonly, create) the store.

        Args:
            path: store directory; the LMDB environment lives in `path/kv.lmdb/`.
            readonly: open for reading only; the store must exist.
            map_size: initial memory-map size in bytes (grows automatically on writes).

        Raises:
            StoreError: readonly and no store exists, or LMDB cannot open it.
        """
        self.path = Path(path)
        self.readonly = readonly
        self._env_path = self.path / "kv.lmdb"
        if readonly and not (self._env_path / "data.mdb").is_file():
            raise StoreError(f"no store at {self.path}: run `chunkcache ingest PATH --store {self.path}` first")
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
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
        self._dbs = self._open_dbs()

    # ---- lifecycle

    def close(self) -> None:
        """Close the environment; the store object is unusable afterwards. Safe to call twice."""
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
        """Store chunks atomically (one write transaction); keys already stored are left untouched.

        Args:
            items: (key, kv [2, layers, kv_heads, tokens, head_dim], meta (JSON-serializable dict),
                embedding float32 [dim] or None) per chunk.

        Returns:
            key -> int64 chunk id for every item (new ids are sequential; existing keys keep theirs).

        Raises:
            ValueError: a malformed item (nothing is written).
            StoreError: the write failed (e.g. disk full); the store is unchanged.
        """
        items = list(items)
        # Encoded once and kept across map-growth retries.
        encoded: dict[bytes, tuple[bytes, bytes | None, int, int]] = {}

        def write(txn: lmdb.Transaction) -> dict[bytes, int]:
            key_to_id: dict[bytes, int] = {}
            next_id = self._next_id(txn)
            totals = self._totals(txn)
            emb_dim = _int_or_none(txn.get(_EMB_DIM, db=self._dbs["info"]))
            for index, item in enumerate(items):
                key, kv, meta, emb = _unpack_item(item, index)
                if key in key_to_id:
                    continue
                stored_meta = txn.get(key, db=self._dbs["meta"])
                if stored_meta is not None:
                    key_to_id[key] = json.loads(stored_meta)["id"]
                    continue
                if key not in encoded:
                    encoded[key] = _encode_item(key, kv, emb)
                kv_bytes, emb_bytes, num_payload, num_tokens = encoded[key]
                if emb_bytes is not None:
                    emb_dim = _check_emb_dim(emb_dim, len(emb_bytes) // 4, key)
                meta_bytes = _meta_json(key, meta, next_id)
                txn.put(key, kv_bytes, db=self._dbs["kv"])
                txn.put(key, meta_bytes, db=self._dbs["meta"])
                if emb_bytes is not None:
                    txn.put(key, emb_bytes, db=self._dbs["emb"])
                txn.put(_ID.pack(next_id), key, db=self._dbs["ids"])
                key_to_id[key] = next_id
                next_id += 1
                totals["kv_bytes"] += num_payload
                totals["num_tokens"] += num_tokens
            txn.put(_NEXT_ID, _ID.pack(next_id), db=self._dbs["info"])
            txn.put(_TOTALS, json.dumps(totals).encode(), db=self._dbs["info"])
            if emb_dim is not None:
                txn.put(_EMB_DIM, str(emb_dim).encode(), db=self._dbs["info"])
            return key_to_id

        return self._write(write)

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
            kv_reader = KVReader(txn, self._dbs)
            try:
                yield kv_reader
            finally:
                kv_reader._close()

    def get_meta(self, key: bytes) -> dict | None:
        """The chunk's metadata dict, or None if the key is not stored."""
        with self._read_txn() as txn:
            buf = txn.get(key, db=self._dbs["meta"])
        return None if buf is None else json.loads(buf)

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

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored (id, embedding) pairs, in id order, for rebuilding the vector index.

        Returns:
            ids int64 [n], embeddings float32 [n, dim] (shape [0, 0] when none are stored).
        """
        ids, rows = [], []
        with self._read_txn() as txn:
            emb_db = self._dbs["emb"]
            for id_bytes, key in txn.cursor(db=self._dbs["ids"]):
                emb = txn.get(key, db=emb_db)
                if emb is not None:
                    ids.append(_ID.unpack(id_bytes)[0])
                    rows.append(np.frombuffer(emb, dtype=np.float32))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.asarray(ids, dtype=np.int64), np.stack(rows)

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
            try:
                return {name: self._env.open_db(name.encode(), create=False) for name in DB_NAMES}
            except lmdb.Error as e:
                raise StoreError(
                    f"the store at {self.path} is incomplete ({e}); re-run `chunkcache ingest` into a new store"
                ) from e
        return self._write(lambda txn: {name: self._env.open_db(name.encode(), txn=txn) for name in DB_NAMES})

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
                    raise StoreError(
                        f"writing to the store at {self.path} failed: {e}. The store is unchanged; "
                        "free disk space (or fix permissions) and retry"
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


def _unpack_item(item, index: int):
    if not isinstance(item, (tuple, list)) or len(item) != 4:
        raise ValueError(f"put_chunks item {index}: expected (key, kv, meta, embedding), got {type(item).__name__}")
    key, kv, meta, emb = item
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"put_chunks item {index}: key must be {KEY_BYTES} bytes from chunk_key(), got {key!r:.60}")
    if not isinstance(meta, dict):
        raise ValueError(f"put_chunks item {index}: meta must be a dict, got {type(meta).__name__}")
    return key, kv, meta, emb


def _encode_item(key: bytes, kv, emb) -> tuple[bytes, bytes | None, int, int]:
    """(kv bytes, embedding bytes or None, payload bytes, tokens) of one new chunk."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[0] != 2:
        shape = list(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise ValueError(
            f"chunk {key.hex()[:16]}: kv must be a tensor [2, layers, kv_heads, tokens, head_dim], got {shape}"
        )
    emb_bytes = None
    if emb is not None:
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 1 or emb.size == 0 or not np.isfinite(emb).all():
            raise ValueError(
                f"chunk {key.hex()[:16]}: embedding must be a finite float32 vector [dim], got shape {emb.shape}"
            )
        emb_bytes = np.ascontiguousarray(emb).tobytes()
    return encode_kv(kv), emb_bytes, kv.numel() * kv.element_size(), kv.shape[3]


def _meta_json(key: bytes, meta: dict, chunk_id: int) -> bytes:
    try:
        return json.dumps({**meta, "id": chunk_id}, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"chunk {key.hex()[:16]}: meta is not JSON-serializable: {e}") from e


def _check_emb_dim(emb_dim: int | None, dim: int, key: bytes) -> int:
    if emb_dim is not None and dim != emb_dim:
        raise ValueError(
            f"chunk {key.hex()[:16]}: embedding has dim {dim}, the store holds dim {emb_dim}; the embedder "
            "changed: ingest into a new store"
        )
    return dim


def _int_or_none(buf) -> int | None:
    return None if buf is None else int(bytes(buf))
