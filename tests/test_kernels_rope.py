"""rerotate_keys: Triton (interpreted on CPU) and torch paths vs the fp32 reference, and RoPE's invariants."""

from blend_kernels.testing import interpret_without_cuda

interpret_without_cuda()  # before any kernel module is imported

import pytest
import torch

import blend_kernels as bk
from blend_kernels.rope.reference import rerotate_keys_reference
from blend_kernels.testing import DTYPE_IDS, assert_close, triton_runs_on_cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cpu_triton = pytest.mark.skipif(not triton_runs_on_cpu(), reason="TRITON_INTERPRET is off (CUDA machine)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=needs_cpu_triton)]


def inv_freq_for(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """HF Llama RoPE written out here, independent of the package: x [..., tokens, head_dim] fp32."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


def chunk_deltas(*chunks: tuple[int, int]) -> torch.Tensor:
    """(length, delta) per chunk -> int64 [tokens]: several chunks moved by different offsets."""
    return torch.cat([torch.full((n, ), d, dtype=torch.int64) for n, d in chunks])


# (keys shape, chunks) -- a single token, odd token counts, leading layer dims, head_dim 16 and 64.
CASES = {
    "1tok-d16": ((2, 1, 16), [(1, 7)]),
    "37tok-3chunks-d64": ((3, 37, 64), [(10, 5), (20, -3), (7, 0)]),
    "layers-19tok-d16": ((2, 3, 19, 16), [(19, 1000)]),
    "layers2x2-33tok-d64": ((2, 2, 1, 33, 64), [(3, 0), (30, 4097)]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case, dtype):
    shape, chunks = CASES[case]
    torch.manual_seed(0)
    keys = torch.randn(shape).to(dtype)
    deltas = chunk_deltas(*chunks)
    inv_freq = inv_freq_for(shape[-1])
    with bk.use_backend(backend):
        got = bk.rerotate_keys(keys, deltas, inv_freq)
    assert got.dtype == dtype and got.shape == keys.shape
    assert_close(got, rerotate_keys_reference(keys, deltas, inv_freq), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_strided_out_view_and_leaves_the_rest(backend, dtype):
    torch.manual_seed(1)
    cache = torch.randn(2, 3, 50, 16).to(dtype)
    before = cache.clone()
    keys = torch.randn(2, 3, 21, 16)  # fp32 in, cache dtype out
    deltas = chunk_deltas((11, 3), (10, -2))
    inv_freq = inv_freq_for(16)
    out = cache[:, :, 7:28, :]
    with bk.use_backend(backend):
        ret = bk.rerotate_keys(keys, deltas, inv_freq, out=out)
    assert ret is out
    assert_close(cache[:, :, 7:28], rerotate_keys_reference(keys, deltas, inv_freq), dtype)
    assert torch.equal(cache[:, :, :7], before[:, :, :7]) and torch.equal(cache[:, :, 28:], before[:, :, 28:])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place(backend, dtype):
    torch.manual_seed(2)
    keys = torch.randn(3, 2, 13, 64).to(dtype)
    expected = rerotate_keys_reference(keys, chunk_deltas((13, 9)), inv_freq_for(64))
    with bk.use_backend(backend):
        bk.rerotate_keys(keys, chunk_deltas((13, 9)), inv_freq_for(64), out=keys)
    assert_close(keys, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_unmergeable_leading_dims(backend):
    torch.manual_seed(3)
    keys = torch.randn(2, 3, 2, 9, 16)
    out = torch.empty(3, 2, 2, 9, 16).transpose(0, 1)  # leading dims no view can merge
    with bk.use_backend(backend):
        bk.rerotate_keys(keys, chunk_deltas((9, 5)), inv_freq_for(16), out=out)
    assert_close(out, rerotate_keys_reference(keys, chunk_deltas((9, 5)), inv_freq_for(16)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_zero_is_exact_identity(backend, dtype):
    torch.manual_seed(4)
    keys = torch.randn(2, 3, 17, 64).to(dtype)
    with bk.use_backend(backend):
        got = bk.rerotate_keys(keys, torch.zeros(17, dtype=torch.int64), inv_freq_for(64))
        as_fp32 = bk.rerotate_keys(keys, torch.zeros(17, dtype=torch.int64), inv_freq_for(64),
                                   out=torch.empty(keys.shape))
    assert torch.equal(got, keys)
    assert torch.equal(as_fp32, keys.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotations_compose(backend):
    torch.manual_seed(5)
    keys = torch.randn(3, 29, 64)
    a, b = chunk_deltas((14, 40), (15, -7)), chunk_deltas((14, 313), (15, 2))
    inv_freq = inv_freq_for(64)
    with bk.use_backend(backend):
        twice = bk.rerotate_keys(bk.rerotate_keys(keys, a, inv_freq), b, inv_freq)
        once = bk.rerotate_keys(keys, a + b, inv_freq)
    # fp32 angles of ~350 rad carry ~3e-5 rad of rounding each way.
    assert_close(twice, once, torch.float32, scale=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerotated_keys_equal_keys_computed_at_the_target_positions(backend):
    torch.manual_seed(6)
    raw = torch.randn(2, 3, 24, 64)  # pre-RoPE keys of two chunks of 12 tokens
    inv_freq = inv_freq_for(64)
    old_pos = torch.cat((torch.arange(30, 42), torch.arange(30, 42)))  # both computed after a 30-token prefix
    new_pos = torch.arange(100, 124)  # now placed one after the other at 100
    cached = rope_at(raw, old_pos, inv_freq)
    with bk.use_backend(backend):
        moved = bk.rerotate_keys(cached, new_pos - old_pos, inv_freq)
    torch.testing.assert_close(moved, rope_at(raw, new_pos, inv_freq), atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_cuda_kernel_matches_reference(dtype):
    torch.manual_seed(7)
    cache = torch.randn(4, 8, 300, 128, device="cuda").to(dtype)
    keys = cache[:, :, 10:261]
    deltas = chunk_deltas((100, 50), (151, 2000)).cuda()
    inv_freq = inv_freq_for(128).cuda()
    expected = rerotate_keys_reference(keys, deltas, inv_freq)
    bk.rerotate_keys(keys, deltas, inv_freq, out=keys)  # auto backend -> Triton, in place on a view
    assert_close(keys, expected, dtype)
