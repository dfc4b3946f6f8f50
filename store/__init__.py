"""chunkcache KV store: content-addressed chunk KV caches, metadata and embeddings, in LMDB (embedded) or Redis
(shared), or LMDB in front of Redis (store/backend.py)."""

from .backend import StoreBackend, StoreSpec, open_backend, parse_store_spec, store_exists
from .codec import KV_FORMAT_VERSION, QuantizedKV, decode_kv, encode_kv, quantize_kv
from .errors import CorruptEntryError, DamagedStoreError, DiskFullError, StoreError, StoreUnavailableError
from .keys import chunk_key
from .kvstore import KVReader, KVStore

__all__ = [
    "KV_FORMAT_VERSION",
    "CorruptEntryError",
    "DamagedStoreError",
    "DiskFullError",
    "KVReader",
    "KVStore",
    "QuantizedKV",
    "StoreBackend",
    "StoreError",
    "StoreSpec",
    "StoreUnavailableError",
    "chunk_key",
    "decode_kv",
    "encode_kv",
    "open_backend",
    "parse_store_spec",
    "quantize_kv",
    "store_exists",
]
