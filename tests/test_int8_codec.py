"""int8 KV entries (KIVI-style: per-channel K, per-token V): error bounds, format, checksum, and a pipeline
on an int8 store."""
from __future__ import annotations

import struct

import pytest
import torch

from chunkcache import ChunkCacheConfig, RAGPipeline
from chunkcache.accounting import kv_entry_bytes
from store import CorruptEntryError, QuantizedKV, chunk_key, decode_kv, encode_kv, quantize_kv
from store.codec import entry_sizes, payload_bytes

from .conftest import open_tiny_pipe
from .test_pipeline_faults import flip

QUESTION = "Where is Mount Everest?"
FORCED = [1000, 2000, 3000, 4000, 5000]
SHAPES = [(2, 1, 1, 1, 1), (2, 3, 2, 63, 60), (2, 2, 5, 7, 3), (2, 4, 2, 200, 16)]


def kv_like_a_model(shape, seed=0) -> torch.Tensor:
    """Random KV with what makes KV hard to quantize: K channels with large offsets and spreads, V tokens
    with different magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    _, layers, kv_heads, tokens, head_dim = shape
    k = torch.randn(layers, kv_heads, tokens, head_dim, generator=gen)
    k = k * torch.rand(layers, kv_heads, 1, head_dim, generator=gen) * 8 + torch.randn(
        layers, kv_heads, 1, head_dim, generator=gen) * 20
    v = torch.randn(layers, kv_heads, tokens, head_dim, generator=gen) * torch.rand(
        layers, kv_heads, tokens, 1, generator=gen) * 3
    return torch.stack((k, v))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_round_trip_error_is_within_half_a_step_per_channel_and_token(shape):
    kv = kv_like_a_model(shape)
    out = decode_kv(encode_kv(quantize_kv(kv)))
    assert out.dtype == torch.float32 and out.shape == kv.shape
    err = (out - kv).abs()
    # K: per (layer, kv head, channel) over the chunk's tokens; V: per (layer, kv head, token) over head_dim.
    # Bound: half a step, step = (max - min) / 255, plus float32 rounding of (code + 128) * step + min.
    for x, e, dim in ((kv[0], err[0], 2), (kv[1], err[1], 3)):
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
        bound = (hi - lo) / 510 + 1e-6 * torch.maximum(lo.abs(), hi.abs())
        assert bool((e <= bound).all()), f"max error / bound {(e / bound.clamp_min(1e-30)).max().item():.3f}"


def test_per_channel_keys_keep_small_channels_precise():
    """A K channel with a tiny range is not swamped by a large one next to it (per channel, not per tensor)."""
    kv = torch.zeros(2, 1, 1, 32, 4)
    kv[0, ..., 0] = torch.linspace(-100, 100, 32)
    kv[0, ..., 1] = torch.linspace(0.001, 0.002, 32) + 5.0
    out = decode_kv(encode_kv(quantize_kv(kv)))
    assert (out[0, ..., 1] - kv[0, ..., 1]).abs().max() <= 0.001 / 510 + 1e-6 * 5.002
    assert (out[0, ..., 0] - kv[0, ..., 0]).abs().max() <= 200 / 510 + 1e-4


def test_constant_groups_and_empty_chunks_round_trip_exactly():
    kv = torch.full((2, 2, 3, 5, 4), 1.25)
    assert torch.equal(decode_kv(encode_kv(quantize_kv(kv))), kv)
    empty = torch.zeros(2, 2, 3, 0, 4)
    assert decode_kv(encode_kv(quantize_kv(empty))).shape == (2, 2, 3, 0, 4)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_kv(torch.tensor([1.0, float("inf")]).expand(2, 1, 1, 1, 2).contiguous())
    with pytest.raises(ValueError, match=r"\[2, layers, kv_heads, tokens, head_dim\]"):
        quantize_kv(torch.zeros(2, 3, 4))


def test_header_and_sizes():
    q = quantize_kv(kv_like_a_model((2, 3, 2, 7, 8)))
    buf = encode_kv(q)
    magic, version, code, ndim, header_len = struct.unpack_from("<4sHBBI", buf)
    assert (magic, version, code, ndim, header_len) == (b"CCKV", 1, 4, 5, 64)
    assert struct.unpack_from("<5Q", buf, 16) == (2, 3, 2, 7, 8)
    expected = 2 * 3 * 2 * 7 * 8 + 4 * 2 * 3 * 2 * (8 + 7)  # codes + K scale/min per channel + V per token
    assert payload_bytes((2, 3, 2, 7, 8), "int8") == expected == len(buf) - 64
    assert entry_sizes(buf) == (expected, 7)
    assert kv_entry_bytes(7, 3, 2, 8, "int8") == expected


def test_size_is_about_half_of_float16_for_the_default_model():
    """SmolLM2-135M: 30 layers, 3 kv heads, head_dim 64; a 256-token chunk (the default chunk size)."""
    shape = (2, 30, 3, 256, 64)
    ratio = payload_bytes(shape, "int8") / payload_bytes(shape, "float16")
    assert ratio == pytest.approx(0.5 + 4 / 64 / 2 + 4 / 256 / 2, abs=1e-9)  # 0.5 + V stats + K stats = 0.539


@pytest.mark.parametrize("offset", [70, -1, -200], ids=["code", "last-v-min", "stats"])
def test_flipped_payload_byte_fails_checksum(offset):
    buf = bytearray(encode_kv(quantize_kv(kv_like_a_model((2, 2, 2, 9, 8)))))
    buf[offset] ^= 0x10
    with pytest.raises(CorruptEntryError, match="checksum mismatch"):
        decode_kv(bytes(buf))


def test_damaged_int8_header_is_refused():
    buf = bytearray(encode_kv(quantize_kv(kv_like_a_model((2, 1, 1, 3, 4)))))
    buf[16:24] = struct.pack("<Q", 3)  # shape[0] = 3
    with pytest.raises(CorruptEntryError):
        decode_kv(bytes(buf))
    with pytest.raises(CorruptEntryError, match="truncated"):
        decode_kv(encode_kv(quantize_kv(kv_like_a_model((2, 1, 1, 3, 4))))[:-1])


def test_float16_entries_are_unchanged():
    """Old stores stay readable: the float16 format and its bytes did not change."""
    kv = kv_like_a_model((2, 1, 2, 3, 4)).half()
    buf = encode_kv(kv)
    assert buf[6] == 1 and len(buf) == 64 + kv.numel() * 2
    assert torch.equal(decode_kv(buf), kv)


def test_encode_refuses_inconsistent_quantized_kv():
    q = quantize_kv(kv_like_a_model((2, 1, 1, 3, 4)))
    with pytest.raises(ValueError, match="inconsistent QuantizedKV"):
        encode_kv(QuantizedKV(q.codes, q.k_scale.half(), q.k_min, q.v_scale, q.v_min))


def test_int8_is_a_store_setting_with_its_own_keys():
    from bench.run import parse_args
    from chunkcache.cli import build_parser

    assert ChunkCacheConfig(kv_dtype="int8").kv_dtype == "int8"
    assert build_parser().parse_args(["ingest", "docs", "--kv-dtype", "int8"]).kv_dtype == "int8"
    assert parse_args(["--kv-dtype", "int8"]).kv_dtype == "int8"
    args = ("fp", [1, 2], [3, 4])
    assert chunk_key(*args, kv_dtype="int8") != chunk_key(*args, kv_dtype="float16")


@pytest.fixture
def int8_pipe(tmp_path, tiny_lm, hash_embedder):
    pipe = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, kv_dtype="int8")
    yield pipe
    pipe.close()


def raw_entries(pipe, keys) -> list[bytes]:
    kv = pipe.rt.store.kv
    with kv._read_txn() as txn:
        return [bytes(txn.get(k, db=kv._dbs["kv"])) for k in keys]


def test_int8_store_answers_and_records_its_dtype(int8_pipe, docs, tmp_path, tiny_lm, hash_embedder):
    answer = int8_pipe.query(QUESTION, documents=docs, mode="blend", max_new_tokens=4)
    assert answer.stats.chunk_misses == len(docs) and len(answer.token_ids) == 4
    again = int8_pipe.query(QUESTION, documents=docs, mode="blend", max_new_tokens=4)
    assert again.stats.chunk_hits == len(docs) and again.token_ids == answer.token_ids
    store = int8_pipe.rt.store.kv
    assert store.manifest["kv_dtype"] == "int8"
    keys = [bytes.fromhex(s.key) for s in again.sources]
    assert all(buf[6] == 4 for buf in raw_entries(int8_pipe, keys))
    lm = int8_pipe.rt.lm
    tokens = [len(s) for s in (int8_pipe.rt.store.kv.get_meta(k)["token_ids"] for k in keys)]
    prefix = len(int8_pipe.rt.template.prefix_ids)
    expected = sum(kv_entry_bytes(n, lm.num_layers, lm.num_kv_heads, lm.head_dim, "int8") for n in tokens + [prefix])
    assert store.stats()["kv_bytes"] == expected
    int8_pipe.close()
    with pytest.raises(ValueError, match="cannot be overridden"):
        RAGPipeline.open(tmp_path / "store", lm=tiny_lm, embedder=hash_embedder, kv_dtype="float16")


def test_reuse_of_one_chunk_after_the_prefix_is_close_to_full(int8_pipe, docs):
    """With one chunk right after the prefix, reuse differs from full only by int8 rounding (float32 stores:
    equal to 1e-4, tests/test_blend_invariants.py). Tolerance: mean KL(full || reuse) below 1e-3 nats per
    position and every position's top-1 token the same. Measured on this model: mean KL 2.8e-4 (max 7.5e-4,
    max |logprob difference| 0.18); a float16 store gives 1.3e-6."""
    full, _ = int8_pipe.score(QUESTION, FORCED, documents=docs[:1], mode="full")
    reuse, stats = int8_pipe.score(QUESTION, FORCED, documents=docs[:1], mode="reuse")
    assert stats.chunk_hits + stats.chunk_misses == 1
    kl = (full.exp() * (full - reuse)).sum(-1)
    assert kl.mean().item() < 1e-3, kl.tolist()
    assert torch.equal(full.argmax(-1), reuse.argmax(-1))
    assert (reuse - full).abs().max().item() > 0  # it is quantized: not bit-equal to full


def test_stored_entries_unchanged_by_queries(int8_pipe, docs):
    int8_pipe.query(QUESTION, documents=docs, mode="reuse", max_new_tokens=1)
    keys = [bytes.fromhex(s.key) for s in int8_pipe.query(QUESTION, documents=docs, mode="reuse",
                                                          max_new_tokens=1).sources]
    before = raw_entries(int8_pipe, keys)
    for mode in ("blend", "epic", "reuse"):
        answer = int8_pipe.query(QUESTION, documents=docs, mode=mode, recompute_ratio=0.5, max_new_tokens=3)
        assert answer.stats.chunk_hits == len(docs)
    assert raw_entries(int8_pipe, keys) == before


def test_damaged_int8_entry_is_recomputed_as_stored(int8_pipe, docs):
    """A recomputed (miss) chunk is placed dequantized, exactly as a read of its stored entry gives it."""
    clean, _ = int8_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse")
    keys = [bytes.fromhex(s.key) for s in int8_pipe.query(QUESTION, documents=docs, mode="reuse",
                                                          max_new_tokens=1).sources]
    before = raw_entries(int8_pipe, keys)
    flip(int8_pipe, "kv", keys[1])
    damaged, stats = int8_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse")
    assert stats.damaged_chunks == 1
    torch.testing.assert_close(damaged, clean, rtol=0, atol=1e-5)
    assert raw_entries(int8_pipe, keys) == before  # rewritten with the same codes
