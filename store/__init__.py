"""chunkcache KV store: content-addressed chunk KV caches, metadata and embeddings in LMDB."""

from .codec import KV_FORMAT_VERSION, QuantizedKV, decode_kv, encode_kv, quantize_kv
from .errors import CorruptEntryError, DamagedStoreError, DiskFullError, StoreError
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
    "StoreError",
    "chunk_key",
    "decode_kv",
    "encode_kv",
    "quantize_kv",
]
