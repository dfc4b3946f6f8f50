"""scatter_rows (Triton interpreted on CPU, torch path) vs the row-by-row reference."""

from blend_kernels.testing import interpret_without_cuda

interpret_without_cuda()  # before any kernel module is imported

import pytest
import torch

import blend_kernels as bk
from blend_kernels.scatter.reference import scatter_rows_reference
from blend_kernels.testing import DTYPE_IDS, assert_equal_after_cast, triton_runs_on_cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cpu_triton = pytest.mark.skipif(not triton_runs_on_cpu(), reason="TRITON_INTERPRET is off (CUDA machine)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=needs_cpu_triton)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_rows", [1, 13, 40], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("head_dim", [16, 60], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_on_a_strided_cache_view(backend, head_dim, num_rows, dtype):
    g = torch.Generator().manual_seed(num_rows)
    cache = torch.randn(2, 3, 64, head_dim, generator=g).to(dtype)  # [layers, kv_heads, Nmax, head_dim]
    rows = torch.randn(3, num_rows, head_dim, generator=g)  # fp32 rows, cast on write
    index = torch.randperm(50, generator=g)[:num_rows]
    expected = cache.clone()
    scatter_rows_reference(expected[1, :, 5:55], rows, index)
    with bk.use_backend(backend):
        bk.scatter_rows(cache[1, :, 5:55], rows, index)
    # Same fp32 -> dtype cast of the same values: exact.
    assert_equal_after_cast(cache, expected, interpreted=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_index_is_a_no_op(backend):
    dst = torch.randn(2, 8, 16)
    before = dst.clone()
    with bk.use_backend(backend):
        bk.scatter_rows(dst, torch.empty(2, 0, 16), torch.empty(0, dtype=torch.int64))
    assert torch.equal(dst, before)


def test_rejects_bad_index():
    dst, rows = torch.zeros(2, 8, 16), torch.ones(2, 3, 16)
    with pytest.raises(ValueError, match=r"\[0, 8\), got min 1, max 8"):
        bk.scatter_rows(dst, rows, torch.tensor([1, 2, 8]))
    with pytest.raises(ValueError, match=r"got min -1"):
        bk.scatter_rows(dst, rows, torch.tensor([-1, 2, 3]))
    with pytest.raises(ValueError, match="must not repeat"):
        bk.scatter_rows(dst, rows, torch.tensor([1, 2, 1]))
    with pytest.raises(ValueError, match="integer"):
        bk.scatter_rows(dst, rows, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"must be \[kv_heads, n, head_dim\] = \[2, 2, 16\]"):
        bk.scatter_rows(dst, rows, torch.tensor([1, 2]))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_cuda_kernel_matches_reference(dtype):
    cache = torch.randn(4, 8, 3000, 128, device="cuda").to(dtype)
    rows = torch.randn(8, 333, 128, device="cuda")
    index = torch.randperm(2500, device="cuda")[:333]
    expected = cache.clone()
    expected[2, :, 100:2600].index_copy_(1, index, rows.to(dtype))
    bk.scatter_rows(cache[2, :, 100:2600], rows, index)  # auto backend -> Triton
    assert torch.equal(cache, expected)
