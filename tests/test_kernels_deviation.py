"""token_deviation (Triton interpreted on CPU, torch path) vs the fp32 reference, and select_tokens exactly."""

from blend_kernels.testing import interpret_without_cuda

interpret_without_cuda()  # before any kernel module is imported

import pytest
import torch

import blend_kernels as bk
from blend_kernels.deviation.reference import token_deviation_reference
from blend_kernels.testing import DTYPE_IDS, assert_close, triton_runs_on_cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cpu_triton = pytest.mark.skipif(not triton_runs_on_cpu(), reason="TRITON_INTERPRET is off (CUDA machine)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=needs_cpu_triton)]

SHAPES = {"1tok-d16": (3, 1, 16), "37tok-d64": (3, 37, 64), "5tok-d60": (2, 5, 60), "9tok-d200": (1, 9, 200)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deviation_matches_reference(backend, shape, dtype):
    torch.manual_seed(0)
    kv_heads, tokens, head_dim = SHAPES[shape]
    fresh = torch.randn(kv_heads, tokens, head_dim).to(dtype)
    # cached is a strided slice of a bigger fp32 cache, as in the query path.
    cache = torch.randn(kv_heads, tokens + 10, head_dim)
    cached = cache[:, 4:4 + tokens]
    with bk.use_backend(backend):
        got = bk.token_deviation(fresh, cached)
    assert got.dtype == torch.float32 and got.shape == (tokens,)
    # The sum is over fp32 values whatever the inputs' dtype: fp32 tolerance.
    assert_close(got, token_deviation_reference(fresh, cached), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deviation_of_identical_rows_is_zero(backend):
    x = torch.randn(2, 7, 16)
    with bk.use_backend(backend):
        assert torch.equal(bk.token_deviation(x, x.clone()), torch.zeros(7))


def test_select_top_scores_ties_to_lower_index():
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, 0.1, 2.0])
    assert bk.select_tokens(scores, 2).tolist() == [1, 3]
    assert bk.select_tokens(scores, 4).tolist() == [1, 2, 3, 5]


def test_select_includes_every_always_token():
    scores = torch.tensor([9.0, 0.0, 8.0, 7.0, 0.0, 0.0, 0.0])
    suffix = torch.tensor([False, False, False, False, True, True, True])
    # The whole suffix, not just its last token, plus the best two of the rest.
    assert bk.select_tokens(scores, 2, always=suffix).tolist() == [0, 2, 4, 5, 6]
    assert bk.select_tokens(scores, 0, always=suffix).tolist() == [4, 5, 6]


def test_select_more_than_candidates_takes_all():
    scores = torch.tensor([1.0, 3.0, 2.0])
    always = torch.tensor([False, True, False])
    assert bk.select_tokens(scores, 10, always=always).tolist() == [0, 1, 2]
    assert bk.select_tokens(scores, 10).dtype == torch.int64
    assert bk.select_tokens(torch.empty(0), 3).tolist() == []


def test_select_rejects_bad_input():
    scores = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="num_select must be >= 0"):
        bk.select_tokens(scores, -1)
    with pytest.raises(ValueError, match="float dtype"):
        bk.select_tokens(torch.tensor([1, 2]), 1)
    with pytest.raises(ValueError, match="bool mask"):
        bk.select_tokens(scores, 1, always=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bool mask"):
        bk.select_tokens(scores, 1, always=torch.tensor([True]))
    with pytest.raises(ValueError, match="NaN"):
        bk.select_tokens(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="must be an int"):
        bk.select_tokens(scores, 1.5)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_cuda_kernel_matches_reference(dtype):
    fresh = torch.randn(8, 1001, 128, device="cuda").to(dtype)
    cached = torch.randn(8, 2000, 128, device="cuda").to(dtype)[:, 500:1501]
    got = bk.token_deviation(fresh, cached)  # auto backend -> Triton
    assert_close(got, token_deviation_reference(fresh, cached), torch.float32, scale=5)
    picked = bk.select_tokens(got, 150)
    assert picked.numel() == 150 and picked.device.type == "cuda"
