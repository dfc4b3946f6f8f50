"""position_causal_attention: Triton (interpreted on CPU) and the blocked torch path vs the naive
fp32 reference, and the position-causal invariant (no query ever sees a later key)."""

from blend_kernels.testing import interpret_without_cuda

interpret_without_cuda()  # before any kernel module is imported

import pytest
import torch

import blend_kernels as bk
from blend_kernels.attention.reference import position_causal_attention_reference
from blend_kernels.attention.torch_impl import position_causal_attention_torch, query_blocks
from blend_kernels.testing import DTYPE_IDS, assert_close, triton_runs_on_cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cpu_triton = pytest.mark.skipif(not triton_runs_on_cpu(), reason="TRITON_INTERPRET is off (CUDA machine)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=needs_cpu_triton)]

# (q_heads, kv_heads): GQA ratios 1, 3, 4.
HEADS = {"mha": (2, 2), "gqa3": (6, 2), "gqa4": (8, 2)}


def make_inputs(q_heads, kv_heads, num_queries, num_keys, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(q_heads, num_queries, head_dim, generator=g).to(dtype)
    k = torch.randn(kv_heads, num_keys, head_dim, generator=g).to(dtype)
    v = torch.randn(kv_heads, num_keys, head_dim, generator=g).to(dtype)
    # Distinct positions in random order with gaps, always including the last key.
    pos = torch.randperm(num_keys, generator=g)[:num_queries]
    if num_queries:
        pos[0] = num_keys - 1
    return q, k, v, pos


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [16, 64], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("num_queries", [1, 37], ids=lambda n: f"nq{n}")
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, heads, num_queries, head_dim, dtype):
    q, k, v, pos = make_inputs(*HEADS[heads], num_queries, 53, head_dim, dtype)
    with bk.use_backend(backend):
        got = bk.position_causal_attention(q, k, v, pos)
    assert got.dtype == dtype and got.shape == q.shape
    assert_close(got, position_causal_attention_reference(q, k, v, pos), dtype)


@needs_cpu_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_triton_small_blocks_skip_later_keys(dtype):
    """16x16 tiles: many query blocks, each stopping at its own last key block."""
    from blend_kernels.attention.kernel import position_causal_attention_triton

    q, k, v, pos = make_inputs(6, 2, 45, 90, 16, dtype, seed=1)
    got = position_causal_attention_triton(q, k, v, pos, 16**-0.5, block_m=16, block_n=16)
    assert_close(got, position_causal_attention_reference(q, k, v, pos), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_custom_scale(backend):
    q, k, v, pos = make_inputs(4, 2, 20, 40, 16, torch.float32, seed=2)
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # [q_heads, nq, d] with nq-major storage
    cache_k = torch.randn(2, 64, 16)
    cache_k[:, :40] = k
    with bk.use_backend(backend):
        got = bk.position_causal_attention(q_t, cache_k[:, :40], v, pos, scale=0.3)
    assert_close(got, position_causal_attention_reference(q, k, v, pos, scale=0.3), torch.float32)


@pytest.mark.parametrize("num_queries", [150, 300, 700], ids=lambda n: f"nq{n}")
def test_blocked_torch_path_matches_reference(num_queries):
    """Shapes big enough for several query blocks; queries spread over the prompt plus a suffix."""
    assert len(query_blocks(num_queries)) > 1
    q, k, v, _ = make_inputs(9, 3, num_queries, 1000, 64, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    suffix = torch.arange(1000 - 40, 1000)
    spread = torch.randperm(960, generator=g)[: num_queries - 40]
    pos = torch.cat((spread, suffix))[torch.randperm(num_queries, generator=g)]
    got = position_causal_attention_torch(q, k, v, pos, 64**-0.5)
    assert_close(got, position_causal_attention_reference(q, k, v, pos), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_query_sees_a_later_key(backend):
    """Changing any key or value after a query's position leaves that query's output bit-identical."""
    q, k, v, pos = make_inputs(6, 2, 12, 30, 16, torch.float32, seed=5)
    with bk.use_backend(backend):
        base = bk.position_causal_attention(q, k, v, pos)
        for i, p in enumerate(pos.tolist()):
            k2, v2 = k.clone(), v.clone()
            k2[:, p + 1:] = 100.0  # would dominate the softmax if it were visible
            v2[:, p + 1:] = -50.0
            out = bk.position_causal_attention(q, k2, v2, pos)
            assert torch.equal(out[:, i], base[:, i]), f"query {i} at position {p} saw a later key"
            later = pos > p
            if later.any():  # the perturbation is visible to queries that sit later
                assert not torch.equal(out[:, later], base[:, later])


def test_differs_from_bottom_right_causal_mask():
    """An early selected query must not get the bottom-right-aligned mask's view of later keys."""
    q, k, v, _ = make_inputs(2, 2, 3, 10, 16, torch.float32, seed=6)
    pos = torch.tensor([1, 5, 9])
    got = bk.position_causal_attention(q, k, v, pos)
    bottom_right = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(3, 10, dtype=torch.bool).tril(diagonal=10 - 3)
    )
    assert torch.allclose(got[:, 2], bottom_right[:, 2], atol=1e-6)  # the last query agrees
    assert not torch.allclose(got[:, 0], bottom_right[:, 0], atol=1e-3)  # query at 1 must not see keys 2..7


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queries(backend):
    q, k, v, _ = make_inputs(4, 2, 0, 10, 16, torch.float32)
    with bk.use_backend(backend):
        got = bk.position_causal_attention(q, k, v, torch.empty(0, dtype=torch.int64))
    assert got.shape == (4, 0, 16)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("heads", HEADS)
def test_cuda_kernel_matches_reference(heads, dtype):
    q, k, v, pos = make_inputs(*HEADS[heads], 333, 2049, 128, dtype, seed=7)
    q, k, v, pos = q.cuda(), k.cuda(), v.cuda(), pos.cuda()
    got = bk.position_causal_attention(q, k, v, pos)  # auto backend -> Triton
    assert_close(got, position_causal_attention_reference(q, k, v, pos), dtype, scale=2)


@pytest.mark.parametrize("bias_rows", ["shared", "per-head"])
@pytest.mark.parametrize("bias_from", [0, 25])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_bias_matches_reference(backend, dtype, bias_from, bias_rows):
    """The per-key log scale (APE-style chunk scale) on the queries at positions >= bias_from."""
    q, k, v, pos = make_inputs(6, 2, 53, 77, 16, dtype, seed=5)
    rows = 1 if bias_rows == "shared" else 6
    # Wider than the keys, as the request cache's capacity is: only the first Nk columns count.
    bias = torch.randn(rows, 90, generator=torch.Generator().manual_seed(6))
    with bk.use_backend(backend):
        got = bk.position_causal_attention(q, k, v, pos, key_bias=bias, bias_from=bias_from)
    expected = position_causal_attention_reference(q, k, v, pos, key_bias=bias[:, :77], bias_from=bias_from)
    assert_close(got, expected, dtype)
    # The bias does change what the affected queries see, and nothing else.
    plain = position_causal_attention_reference(q, k, v, pos)
    affected = pos >= bias_from
    assert (expected[:, affected] - plain[:, affected]).abs().max() > 1e-2
    torch.testing.assert_close(expected[:, ~affected], plain[:, ~affected])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_key_bias_is_plain_attention(backend):
    q, k, v, pos = make_inputs(6, 2, 40, 64, 16, torch.float32, seed=7)
    with bk.use_backend(backend):
        got = bk.position_causal_attention(q, k, v, pos, key_bias=torch.zeros(1, 64))
    assert_close(got, position_causal_attention_reference(q, k, v, pos), torch.float32)


def test_key_bias_shape_is_checked():
    q, k, v, pos = make_inputs(6, 2, 4, 10, 16, torch.float32)
    for bad in (torch.zeros(3, 10), torch.zeros(1, 9), torch.zeros(1, 10, dtype=torch.float16), torch.zeros(10)):
        with pytest.raises(ValueError, match="key_bias"):
            bk.position_causal_attention(q, k, v, pos, key_bias=bad)


@pytest.mark.parametrize("window", [1, 7, 16, 200], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("num_queries", [1, 37, 150], ids=lambda n: f"nq{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_matches_reference(backend, dtype, num_queries, window):
    """Mistral/Gemma sliding windows: query p sees keys p - window < j <= p; a window wider than
    the prompt is plain causal. 150 queries make several torch blocks with their own key ranges."""
    q, k, v, pos = make_inputs(6, 2, num_queries, 181, 16, dtype, seed=8)
    bias = torch.randn(1, 181, generator=torch.Generator().manual_seed(9))
    with bk.use_backend(backend):
        got = bk.position_causal_attention(q, k, v, pos, window=window, key_bias=bias, bias_from=40)
    assert_close(got, position_causal_attention_reference(q, k, v, pos, None, bias, 40, window), dtype)


@needs_cpu_triton
def test_triton_window_rows_that_see_nothing_in_the_first_block():
    """Small tiles and a window narrower than a tile: some rows meet only masked keys in the block
    the program starts at; they must not turn into NaN."""
    from blend_kernels.attention.kernel import position_causal_attention_triton

    q, k, v, pos = make_inputs(2, 2, 40, 120, 16, torch.float32, seed=10)
    got = position_causal_attention_triton(q, k, v, pos, 0.25, window=3, block_m=16, block_n=16)
    assert torch.isfinite(got).all()
    assert_close(got, position_causal_attention_reference(q, k, v, pos, 0.25, window=3), torch.float32)


def test_window_mask_is_exact():
    from blend_kernels.attention.reference import position_causal_mask

    mask = position_causal_mask(torch.tensor([0, 4, 9]), 10, window=3)
    assert mask.nonzero().tolist() == [[0, 0], [1, 2], [1, 3], [1, 4], [2, 7], [2, 8], [2, 9]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_matches_reference(backend):
    q, k, v, pos = make_inputs(6, 2, 30, 64, 16, torch.float32, seed=11)
    q = q * 8  # logits large enough for the cap to matter
    bias = torch.randn(1, 80, generator=torch.Generator().manual_seed(12))  # wider than the keys, as a cache's is
    with bk.use_backend(backend):
        got = bk.position_causal_attention(q, k, v, pos, softcap=5.0, key_bias=bias, bias_from=10)
    expected = position_causal_attention_reference(q, k, v, pos, softcap=5.0, key_bias=bias[:, :64], bias_from=10)
    assert_close(got, expected, torch.float32)
    uncapped = position_causal_attention_reference(q, k, v, pos, key_bias=bias[:, :64], bias_from=10)
    assert (expected - uncapped).abs().max() > 1e-2
