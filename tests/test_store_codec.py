"""KV entry byte format: bit-exact round trips, zero-copy decode, and every corruption named."""

import struct
import zlib

import numpy as np
import pytest
import torch

from store import KV_FORMAT_VERSION, CorruptEntryError, decode_kv, encode_kv

BITS_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
SHAPES = [(2, 1, 1, 1, 1), (2, 3, 2, 63, 60), (2, 2, 5, 7, 3), (2, 1, 1, 0, 4), (5,), ()]


def random_bits(shape, dtype, seed=0):
    """Tensor of `dtype` with uniformly random bit patterns: NaN payloads, infs, subnormals, -0 included."""
    bits_dtype = BITS_DTYPE[dtype]
    info = torch.iinfo(bits_dtype)
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(info.min, info.max + 1, shape, dtype=torch.int64, generator=gen).to(bits_dtype)
    return bits.view(dtype)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(BITS_DTYPE[a.dtype]), b.view(BITS_DTYPE[b.dtype]))


@pytest.mark.parametrize("dtype", list(BITS_DTYPE), ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_round_trip_is_bit_exact(shape, dtype):
    kv = random_bits(shape, dtype)
    assert same_bits(decode_kv(encode_kv(kv)), kv)


@pytest.mark.parametrize("dtype", list(BITS_DTYPE), ids=lambda d: str(d).split(".")[1])
def test_special_values_survive(dtype):
    kv = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 65504.0], dtype=dtype)
    assert same_bits(decode_kv(encode_kv(kv)), kv)


def test_non_contiguous_input_encodes_its_values():
    kv = random_bits((2, 2, 3, 5, 4), torch.float16).transpose(3, 4)
    out = decode_kv(encode_kv(kv))
    assert out.shape == kv.shape and same_bits(out, kv.contiguous())


def test_golden_header_layout():
    payload = struct.pack("<2e", 1.0, -2.0)
    expected = b"CCKV" + struct.pack("<HBBII", KV_FORMAT_VERSION, 1, 2, 32, zlib.crc32(payload))
    expected += struct.pack("<2Q", 1, 2) + payload
    assert encode_kv(torch.tensor([[1.0, -2.0]], dtype=torch.float16)) == expected


def test_kv_header_is_64_bytes():
    buf = encode_kv(torch.zeros(2, 1, 1, 1, 1, dtype=torch.float32))
    assert len(buf) == 64 + 2 * 4
    assert struct.unpack_from("<I", buf, 8)[0] == 64


@pytest.mark.parametrize("dtype", list(BITS_DTYPE), ids=lambda d: str(d).split(".")[1])
def test_decode_is_zero_copy(dtype):
    buf = encode_kv(random_bits((2, 2, 2, 9, 8), dtype))
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    out = decode_kv(memoryview(buf))
    assert out.data_ptr() == base + 64
    assert base <= out.data_ptr() and out.data_ptr() + out.nbytes == base + len(buf)


def test_decode_view_aliases_a_writable_buffer():
    buf = bytearray(encode_kv(torch.zeros(2, 1, 1, 2, 2, dtype=torch.float32)))
    out = decode_kv(buf, verify=False)
    buf[64:68] = struct.pack("<f", 3.5)
    assert out.flatten()[0].item() == 3.5


def test_flipped_payload_byte_fails_checksum():
    buf = bytearray(encode_kv(random_bits((2, 1, 2, 5, 4), torch.bfloat16)))
    buf[-3] ^= 0x10
    with pytest.raises(CorruptEntryError, match="checksum mismatch"):
        decode_kv(bytes(buf))
    assert decode_kv(bytes(buf), verify=False).shape == (2, 1, 2, 5, 4)


def test_corrupt_entry_error_is_a_value_error():
    assert issubclass(CorruptEntryError, ValueError)


@pytest.mark.parametrize("cut", [3, 20, 64, -1], ids=["in-magic", "in-shape", "no-payload", "last-byte"])
def test_truncated_entry(cut):
    buf = encode_kv(torch.ones(2, 1, 1, 4, 4, dtype=torch.float16))
    with pytest.raises(CorruptEntryError, match="truncated"):
        decode_kv(buf[:cut])


def test_trailing_bytes_rejected():
    with pytest.raises(CorruptEntryError, match="trailing bytes"):
        decode_kv(encode_kv(torch.ones(2, 1, 1, 1, 1)) + b"\0")


def test_bad_magic():
    buf = b"XXXX" + encode_kv(torch.ones(2, 1, 1, 1, 1))[4:]
    with pytest.raises(CorruptEntryError, match="bad magic.*chunkcache verify --repair"):
        decode_kv(buf)


@pytest.mark.parametrize("version, age", [(KV_FORMAT_VERSION + 1, "newer"), (0, "older")])
def test_other_format_version(version, age):
    buf = bytearray(encode_kv(torch.ones(2, 1, 1, 1, 1)))
    buf[4:6] = struct.pack("<H", version)
    with pytest.raises(CorruptEntryError, match=f"written by a {age} chunkcache, rebuild with `chunkcache ingest`"):
        decode_kv(bytes(buf))


def test_unknown_dtype_code():
    buf = bytearray(encode_kv(torch.ones(2, 1, 1, 1, 1)))
    buf[6] = 99
    with pytest.raises(CorruptEntryError, match="unknown dtype code 99"):
        decode_kv(bytes(buf))


def test_encode_rejects_unsupported_input():
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        encode_kv(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="expects a torch.Tensor"):
        encode_kv(np.ones(2, dtype=np.float16))
