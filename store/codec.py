"""Byte format of one stored KV entry: a small fixed header plus the raw tensor bytes (never pickle).

Layout (all integers little-endian; see store/README.md):
    0   4B  magic b"CCKV"
    4   u16 format version (KV_FORMAT_VERSION)
    6   u8  dtype code (1 float16, 2 bfloat16, 3 float32, 4 int8 KIVI-style)
    7   u8  ndim
    8   u32 header length in bytes (payload offset; a multiple of 16)
    12  u32 crc32 of the payload
    16  ndim x u64 shape
    ..  zero padding up to the header length
    H   payload: the C-contiguous tensor bytes (bf16 as its raw 16-bit pattern), prod(shape) * itemsize bytes;
        for int8 (shape [2, layers, kv_heads, tokens, head_dim]): the int8 codes, then float32 K scale and K
        minimum [layers, kv_heads, head_dim], then float32 V scale and V minimum [layers, kv_heads, tokens]
"""

from __future__ import annotations

import struct
import sys
import warnings
import zlib
from dataclasses import dataclass

import torch

from .errors import CorruptEntryError

KV_FORMAT_VERSION: int = 1

MAGIC = b"CCKV"
# NOTE: codes are part of the on-disk format: never renumber, only append.
DTYPE_TO_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
CODE_TO_DTYPE = {code: dtype for dtype, code in DTYPE_TO_CODE.items()}
INT8_CODE = 4  # QuantizedKV: int8 codes plus per-group float32 scale and minimum
# The kv_dtype names accepted by chunk_key, one per storable dtype.
KV_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}

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


@dataclass(frozen=True)
class QuantizedKV:
    """A chunk's KV [2, layers, kv_heads, tokens, head_dim] as int8 codes, KIVI-style: K is quantized per
    channel (one scale and minimum per layer, kv head and head_dim channel, over the chunk's tokens), V per
    token (one per layer, kv head and token, over head_dim). Value = (code + 128) * scale + minimum.

    NOTE: asymmetric (a minimum per group, as KIVI does) rather than symmetric: keys are stored after RoPE,
    and their low-frequency channels keep a large per-channel offset (the known outlier channels), which a
    symmetric grid around 0 would spend up to half its 256 codes on. The minimum costs 4 bytes per group.
    Each value is within scale / 2 = (max - min) / 510 of its group's original (plus float32 rounding).
    """

    codes: torch.Tensor  # int8 [2, layers, kv_heads, tokens, head_dim]
    k_scale: torch.Tensor  # float32 [layers, kv_heads, 1, head_dim]
    k_min: torch.Tensor  # float32 [layers, kv_heads, 1, head_dim]
    v_scale: torch.Tensor  # float32 [layers, kv_heads, tokens, 1]
    v_min: torch.Tensor  # float32 [layers, kv_heads, tokens, 1]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dim(self) -> int:
        return self.codes.dim()

    def to(self, device) -> "QuantizedKV":
        return QuantizedKV(*(t.to(device) for t in (self.codes, self.k_scale, self.k_min, self.v_scale, self.v_min)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[2, layers, kv_heads, tokens, head_dim] in `dtype`, computed in float32 (one new tensor)."""
        out = self.codes.to(torch.float32).add_(128.0)
        out[0].mul_(self.k_scale).add_(self.k_min)
        out[1].mul_(self.v_scale).add_(self.v_min)
        return out.to(dtype)


def quantize_kv(kv: torch.Tensor) -> QuantizedKV:
    """int8 KIVI-style codes of a KV tensor [2, layers, kv_heads, tokens, head_dim] (any float dtype, any device).

    Raises:
        ValueError: another shape, or a non-finite value (it has no int8 code).
    """
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[0] != 2:
        shape = list(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise ValueError(f"quantize_kv expects a tensor [2, layers, kv_heads, tokens, head_dim], got {shape}")
    x = kv.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_kv: the KV holds NaN or inf, which int8 cannot represent; store it as float16")
    k_codes, k_scale, k_min = _quantize_groups(x[0], dim=2)  # per channel, over tokens
    v_codes, v_scale, v_min = _quantize_groups(x[1], dim=3)  # per token, over head_dim
    return QuantizedKV(torch.stack((k_codes, v_codes)), k_scale, k_min, v_scale, v_min)


def _quantize_groups(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes like x, scale, minimum) with one scale and minimum per slice along `dim` (kept as size 1)."""
    if x.shape[dim] == 0:
        stat_shape = list(x.shape)
        stat_shape[dim] = 1
        ones = torch.ones(stat_shape, dtype=torch.float32, device=x.device)
        return torch.empty(x.shape, dtype=torch.int8, device=x.device), ones, torch.zeros_like(ones)
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0 gives lo
    codes = torch.round((x - lo) / scale).clamp_(0, 255) - 128
    return codes.to(torch.int8), scale, lo


def payload_bytes(shape, kv_dtype: str) -> int:
    """Payload bytes of an entry of `shape` ([2, layers, kv_heads, tokens, head_dim]) stored as `kv_dtype`."""
    if kv_dtype == "int8":
        _, layers, kv_heads, tokens, head_dim = shape
        return _prod(shape) + 2 * 4 * layers * kv_heads * (head_dim + tokens)
    return _prod(shape) * KV_DTYPE_NAMES[kv_dtype].itemsize


def encode_kv(kv: torch.Tensor | QuantizedKV) -> bytes:
    """Serialize a KV tensor to the store's byte format.

    Args:
        kv: [2, layers, kv_heads, tokens, head_dim] (K then V), float16 / bfloat16 / float32, or a `QuantizedKV`
            (int8). Any tensor shape is encoded faithfully; tensors on another device are copied to CPU first.

    Returns:
        header + raw C-contiguous tensor bytes (one copy of the payload).
    """
    if isinstance(kv, QuantizedKV):
        return _encode_int8(kv)
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


def _encode_int8(q: QuantizedKV) -> bytes:
    _, layers, kv_heads, tokens, head_dim = q.shape
    expected = [(q.k_scale, (layers, kv_heads, 1, head_dim)), (q.k_min, (layers, kv_heads, 1, head_dim)),
                (q.v_scale, (layers, kv_heads, tokens, 1)), (q.v_min, (layers, kv_heads, tokens, 1))]
    if q.codes.dtype != torch.int8 or any(t.dtype != torch.float32 or tuple(t.shape) != s for t, s in expected):
        raise ValueError(f"encode_kv: inconsistent QuantizedKV (codes {q.codes.dtype} {list(q.shape)}, stats "
                         f"{[(t.dtype, list(t.shape)) for t, _ in expected]}); build it with quantize_kv")
    parts = [_bytes_of(t) for t in (q.codes, q.k_scale, q.k_min, q.v_scale, q.v_min)]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    header = _FIXED.pack(MAGIC, KV_FORMAT_VERSION, INT8_CODE, 5, header_length(5), crc)
    shape = struct.pack("<5Q", *q.shape)
    padding = bytes(header_length(5) - len(header) - len(shape))
    return b"".join((header, shape, padding, *parts))


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def decode_kv(buf, *, verify: bool = True) -> torch.Tensor:
    """Decode bytes written by `encode_kv` into a tensor view over `buf`, without copying (except int8).

    Args:
        buf: bytes, bytearray or memoryview (e.g. an LMDB `buffers=True` value). The returned tensor aliases it:
            copy out before the buffer is released (for LMDB: before the read transaction ends).
        verify: check the payload's crc32 (reads every byte once; skip only for data verified already).

    Returns:
        tensor shaped and typed per the header (read-only memory when `buf` is read-only: do not write to it).
        An int8 entry is dequantized into a new float32 tensor instead (a copy, which does not alias `buf`).

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
    if code not in CODE_TO_DTYPE and code != INT8_CODE:
        raise CorruptEntryError(f"KV entry has unknown dtype code {code}; {_REBUILD}")
    if header_len != header_length(ndim) or len(view) < header_len or (code == INT8_CODE and ndim != 5):
        raise CorruptEntryError(
            f"KV entry header is inconsistent or truncated (header length {header_len}, ndim {ndim}, "
            f"buffer {len(view)} bytes); {_REBUILD}"
        )
    shape = struct.unpack_from(f"<{ndim}Q", view, _FIXED.size)
    if code == INT8_CODE and shape[0] != 2:
        raise CorruptEntryError(f"int8 KV entry has shape {list(shape)}, not [2, layers, kv_heads, tokens, head_dim]; "
                                f"{_REBUILD}")
    dtype = CODE_TO_DTYPE.get(code, torch.int8)
    num_payload = payload_bytes(shape, "int8") if code == INT8_CODE else _prod(shape) * dtype.itemsize
    if len(view) - header_len != num_payload:
        problem = "truncated" if len(view) - header_len < num_payload else "has trailing bytes"
        raise CorruptEntryError(
            f"KV entry {problem}: shape {list(shape)} {dtype} needs {num_payload} payload bytes, "
            f"found {len(view) - header_len}; {_REBUILD}"
        )
    payload = view[header_len:]
    if verify and zlib.crc32(payload) != crc:
        raise CorruptEntryError(f"KV entry checksum mismatch (stored crc32 {crc:#010x}); the data is damaged; {_REBUILD}")
    if code == INT8_CODE:
        return _decode_int8(payload, shape).dequantize(torch.float32)
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


def _decode_int8(payload: memoryview, shape) -> QuantizedKV:
    """The QuantizedKV over an int8 entry's checked payload (codes alias it; the float32 stats are copies)."""
    _, layers, kv_heads, tokens, head_dim = shape
    num_codes = _prod(shape)
    pieces, offset = [], num_codes
    for stat_shape in [(layers, kv_heads, 1, head_dim)] * 2 + [(layers, kv_heads, tokens, 1)] * 2:
        size = 4 * _prod(stat_shape)
        # A copy: the stats may sit misaligned for float32 in the buffer, and they are small.
        pieces.append(torch.frombuffer(bytearray(payload[offset:offset + size]), dtype=torch.float32).view(stat_shape)
                      if size else torch.empty(stat_shape, dtype=torch.float32))
        offset += size
    if num_codes:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            codes = torch.frombuffer(payload, dtype=torch.int8, count=num_codes).view(shape)
    else:
        codes = torch.empty(shape, dtype=torch.int8)
    return QuantizedKV(codes, *pieces)


def entry_sizes(buf) -> tuple[int, int] | None:
    """(payload bytes, tokens) from an entry's header alone, without reading or checking the payload.

    Returns None when the header is unreadable (bad magic, version or length), e.g. for a damaged entry.
    """
    view = memoryview(buf).cast("B")
    if len(view) < _FIXED.size:
        return None
    magic, version, code, ndim, header_len, _crc = _FIXED.unpack_from(view)
    known = code in CODE_TO_DTYPE or code == INT8_CODE
    if magic != MAGIC or version != KV_FORMAT_VERSION or not known or ndim < 4:
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
