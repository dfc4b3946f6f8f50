"""Byte format of a chunk's metadata and embedding values: a 12-byte checked header, then the body.

Layout (little-endian; see store/README.md):
    0   4B  magic: b"CCM1" (metadata, body = UTF-8 JSON) or b"CCE1" (embedding, body = float32 [dim])
    4   u32 body length in bytes
    8   u32 crc32 (zlib) of the body
    12  body

Values written before checksums existed are read as they are (JSON starting with "{", or a bare float32
vector), without a check; `chunkcache verify --repair` rewrites them in this format.
"""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np

from .errors import CorruptEntryError

META_MAGIC = b"CCM1"
EMB_MAGIC = b"CCE1"
_HEADER = struct.Struct("<4sII")  # magic, body length, crc32
_REPAIR = "run `chunkcache verify --repair` to recompute or drop it"


def encode_meta(meta: dict) -> bytes:
    """Checked bytes of a JSON-serializable metadata dict."""
    return _wrap(META_MAGIC, json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def decode_meta(buf) -> dict:
    """The metadata dict from `encode_meta` bytes (or a legacy bare JSON value).

    Raises:
        CorruptEntryError: bad header, wrong length, checksum mismatch or invalid JSON.
    """
    view = memoryview(buf)
    if len(view) and view[0] == ord("{"):  # legacy: written before checksums
        body = view
    else:
        body = _unwrap(view, META_MAGIC, "metadata")
    try:
        meta = json.loads(bytes(body))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptEntryError(f"metadata is not valid JSON ({e}); {_REPAIR}") from None
    if not isinstance(meta, dict):
        raise CorruptEntryError(f"metadata is a {type(meta).__name__}, not an object; {_REPAIR}")
    return meta


def encode_emb(vec: np.ndarray) -> bytes:
    """Checked bytes of a float32 [dim] embedding."""
    return _wrap(EMB_MAGIC, np.ascontiguousarray(vec, dtype=np.float32).tobytes())


def decode_emb(buf, dim: int | None = None) -> np.ndarray:
    """The float32 [dim] embedding from `encode_emb` bytes (or a legacy bare vector), a copy.

    Args:
        buf: the stored bytes.
        dim: the store's embedding dimension, if known: a vector of another size is corrupt.

    Raises:
        CorruptEntryError: bad header, wrong length, checksum mismatch, wrong dim or non-finite values.
    """
    view = memoryview(buf)
    legacy = dim is not None and len(view) == 4 * dim and bytes(view[:4]) != EMB_MAGIC
    body = view if legacy else _unwrap(view, EMB_MAGIC, "embedding")
    if len(body) % 4 or (dim is not None and len(body) != 4 * dim):
        raise CorruptEntryError(f"embedding has {len(body)} bytes, expected {4 * dim if dim else 'a multiple of 4'}; "
                                f"{_REPAIR}")
    vec = np.frombuffer(bytes(body), dtype=np.float32)
    if not np.isfinite(vec).all():
        raise CorruptEntryError(f"embedding holds NaN or inf; {_REPAIR}")
    return vec


def is_checked(buf, magic: bytes) -> bool:
    """True if `buf` carries this module's header (False for values written before checksums)."""
    return bytes(memoryview(buf)[:4]) == magic


def _wrap(magic: bytes, body: bytes) -> bytes:
    return _HEADER.pack(magic, len(body), zlib.crc32(body)) + body


def _unwrap(view: memoryview, magic: bytes, what: str) -> memoryview:
    # The length is checked before the body is touched: a damaged LMDB size field can make the value
    # extend past the end of the mapped file.
    if len(view) < _HEADER.size:
        raise CorruptEntryError(f"{what} truncated: {len(view)} bytes; {_REPAIR}")
    found, length, crc = _HEADER.unpack_from(view)
    if found != magic:
        raise CorruptEntryError(f"{what} has bad magic {bytes(found)!r} (expected {magic!r}); {_REPAIR}")
    if length != len(view) - _HEADER.size:
        raise CorruptEntryError(f"{what} body should be {length} bytes, found {len(view) - _HEADER.size}; {_REPAIR}")
    body = view[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise CorruptEntryError(f"{what} checksum mismatch (stored crc32 {crc:#010x}); {_REPAIR}")
    return body
