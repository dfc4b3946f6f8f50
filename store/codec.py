"""Byte format of one stored KV entry: a small fixed header plus the raw tensor bytes (never pickle).

Layout (all integers little-endian; see store/README.md):
    0   4B  magic b"CCKV"
    4   u16 format version (KV_FORMAT_VERSION)
    6   u8  dtype code (1 float16, 2 bfloat16, 3 float32)
    7   u8  ndim
    8   u32 header length in bytes (payload offset; a multiple of 16)
    12  u32 crc32 of the payload
    16  ndim x u64 shape
    ..  zero padding up to the header length
    H   payload: the C-contiguous tensor bytes (bf16 as its raw 16-bit pattern), prod(shape) * itemsize bytes
"""

from __future__ import annotations

import struct
import sys
import warnings
import zlib

import torch

from .errors import CorruptEntryError

KV_FORMAT_VERSION: int = 1

MAGIC = b"CCKV"
# NOTE: codes are part of the on-disk format: never renumber, only append.
DTYPE_TO_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
CODE_TO_DTYPE = {code: dtype for dtype, code in DTYPE_TO_CODE.items()}
# The kv_dtype names accepted by chunk_key, one per storable dtype.
KV_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

_FIXED = struct.Struct("<4sHBBII")  # magic, version, dtype code, ndim, header length, crc32
_HEADER_ALIGN = 16  # keeps the payload aligned for every supported dtype whenever the buffer start is
_MAX_NDIM = 255
_REBUILD = "queries recompute it on their own; `chunkcache verify --repair` rewrites every damaged entry"

# The payload is written in host byte order; all supported hosts (x86-64, aarch64) are little-endian.
assert sys.byteorder == "little", "chunkcache's KV format assumes a little-endian host"


def header_length(ndim: int) -> int:
    """Bytes before the payload for a tensor of `ndim` dimensions (fixed part + shape, padded)."""
    raw = _FIXED.size + 8 * ndim
    return -(-raw // _HEADER_ALIGN) * _HEADER_ALIGN


def encode_kv(kv: torch.Tensor) -> bytes:
    """Serialize a KV tensor to the store's byte format.

    Args:
        kv: [2, layers, kv_heads, tokens, head_dim] (K then V), float16 / bfloat16 / float32. Any shape is
            encoded faithfully; tensors on another device are copied to CPU first.

    Returns:
        header + raw C-contiguous tensor bytes (one copy of the payload).
    """
    if not isinstance(kv, torch.Tensor):
        raise ValueError(f"encode_kv expects a torch.Tensor, got {type(kv).__name__}")
    if kv.dtype not in DTYPE_TO_CODE:
        raise ValueError(
            f"encode_kv: unsupported dtype {kv.dtype}; store KV as float16, bfloat16 or float32 (cast with .to())"
        )
    if kv.dim() > _MAX_NDIM:
        raise ValueError(f"encode_kv: {kv.dim()} dimensions, at most {_MAX_NDIM} are supported")
    kv = kv.detach().cpu().contiguous()
    # A uint8 view reinterprets the bits, so bf16 (which numpy lacks) is written as its raw 16-bit pattern.
    payload = memoryview(kv.reshape(-1).view(torch.uint8).numpy()) if kv.numel() else memoryview(b"")
    header = _FIXED.pack(
        MAGIC, KV_FORMAT_VERSION, DTYPE_TO_CODE[kv.dtype], kv.dim(), header_length(kv.dim()), zlib.crc32(payload)
    )
    shape = struct.pack(f"<{kv.dim()}Q", *kv.shape)
    padding = bytes(header_length(kv.dim()) - len(header) - len(shape))
    return b"".join((header, shape, padding, payload))


def decode_kv(buf, *, verify: bool = True) -> torch.Tensor:
    """Decode bytes written by `encode_kv` into a tensor view over `buf`, without copying.

    Args:
        buf: bytes, bytearray or memoryview (e.g. an LMDB `buffers=True` value). The returned tensor aliases it:
            copy out before the buffer is released (for LMDB: before the read transaction ends).
        verify: check the payload's crc32 (reads every byte once; skip only for data verified already).

    Returns:
        tensor shaped and typed per the header (read-only memory when `buf` is read-only: do not write to it).

    Raises:
        CorruptEntryError: bad magic, other format version, truncated or oversized buffer, checksum mismatch.
    """
    view = memoryview(buf).cast("B")
    if len(view) < _FIXED.size:
        raise CorruptEntryError(f"KV entry truncated: {len(view)} bytes, shorter than the header; {_REBUILD}")
    magic, version, code, ndim, header_len, crc = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntryError(f"KV entry has bad magic {bytes(magic)!r} (expected {MAGIC!r}); {_REBUILD}")
    if version != KV_FORMAT_VERSION:
        age = "newer" if version > KV_FORMAT_VERSION else "older"
        raise CorruptEntryError(
            f"KV entry has format version {version}, this chunkcache reads version {KV_FORMAT_VERSION}: "
            f"store written by a {age} chunkcache, rebuild with `chunkcache ingest`"
        )
    if code not in CODE_TO_DTYPE:
        raise CorruptEntryError(f"KV entry has unknown dtype code {code}; {_REBUILD}")
    if header_len != header_length(ndim) or len(view) < header_len:
        raise CorruptEntryError(
            f"KV entry header is inconsistent or truncated (header length {header_len}, ndim {ndim}, "
            f"buffer {len(view)} bytes); {_REBUILD}"
        )
    shape = struct.unpack_from(f"<{ndim}Q", view, _FIXED.size)
    dtype = CODE_TO_DTYPE[code]
    num_payload = _prod(shape) * dtype.itemsize
    if len(view) - header_len != num_payload:
        problem = "truncated" if len(view) - header_len < num_payload else "has trailing bytes"
        raise CorruptEntryError(
            f"KV entry {problem}: shape {list(shape)} {dtype} needs {num_payload} payload bytes, "
            f"found {len(view) - header_len}; {_REBUILD}"
        )
    payload = view[header_len:]
    if verify and zlib.crc32(payload) != crc:
        raise CorruptEntryError(f"KV entry checksum mismatch (stored crc32 {crc:#010x}); the data is damaged; {_REBUILD}")
    if num_payload == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # NOTE: LMDB buffers are read-only and torch warns about that; callers copy out and never write.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        tensor = torch.frombuffer(view, dtype=dtype, offset=header_len).view(shape)
    if tensor.data_ptr() % dtype.itemsize:
        # Small LMDB values are only 2-byte aligned; misaligned fp32 would be undefined for vectorized kernels.
        tensor = tensor.clone()
    return tensor


def entry_sizes(buf) -> tuple[int, int] | None:
    """(payload bytes, tokens) from an entry's header alone, without reading or checking the payload.

    Returns None when the header is unreadable (bad magic, version or length), e.g. for a damaged entry.
    """
    view = memoryview(buf).cast("B")
    if len(view) < _FIXED.size:
        return None
    magic, version, code, ndim, header_len, _crc = _FIXED.unpack_from(view)
    if magic != MAGIC or version != KV_FORMAT_VERSION or code not in CODE_TO_DTYPE or ndim < 4:
        return None
    if header_len != header_length(ndim) or len(view) < header_len:
        return None
    shape = struct.unpack_from(f"<{ndim}Q", view, _FIXED.size)
    return len(view) - header_len, shape[3]


def _prod(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
