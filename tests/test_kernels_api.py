"""blend_kernels front door: backend choice and the ValueErrors for caller misuse."""

from blend_kernels.testing import interpret_without_cuda

interpret_without_cuda()  # before any kernel module is imported

import pytest
import torch

import blend_kernels as bk
from blend_kernels import _triton, backend
from blend_kernels.testing import triton_runs_on_cpu


@pytest.fixture(autouse=True)
def no_override():
    bk.set_backend(None)
    yield
    bk.set_backend(None)


def test_env_var_and_overrides(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert bk.get_backend() == "auto"
    assert backend.resolve(cpu) == "torch" and backend.resolve(cuda) == "triton"
    assert backend.resolve(cuda, "scatter_rows") == "torch"  # measured faster on a GPU (backend.TORCH_ON_CUDA)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert backend.resolve(cpu) == "triton" and backend.resolve(cuda, "scatter_rows") == "triton"
    with bk.use_backend("torch"):
        assert backend.resolve(cuda) == "torch"
        with bk.use_backend("auto"):
            assert backend.resolve(cpu) == "torch"
        assert bk.get_backend() == "torch"
    assert bk.get_backend() == "triton"
    bk.set_backend("torch")
    assert backend.resolve(cuda) == "torch"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="not a kernel backend"):
        bk.set_backend("cuda")
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="CHUNKCACHE_KERNELS = 'fast'"):
        bk.get_backend()


def test_compiled_kernel_refuses_cpu_tensors():
    class CompiledKernel:  # stands in for a triton JITFunction on a machine with a GPU
        pass

    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _triton.require_launchable(CompiledKernel(), keys=torch.zeros(1))


@pytest.mark.skipif(not triton_runs_on_cpu(), reason="TRITON_INTERPRET is off (CUDA machine)")
def test_env_var_forces_triton_on_cpu(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    x = torch.randn(2, 5, 16)
    assert torch.allclose(bk.token_deviation(x, x + 1), torch.full((5,), 32.0))


KEYS = torch.zeros(2, 5, 16)
DELTAS = torch.zeros(5, dtype=torch.int64)
INV_FREQ = torch.ones(8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keys=torch.zeros(5, 16)), r"\[\.\.\., kv_heads, tokens, head_dim\]"),
        (dict(keys=torch.zeros(2, 5, 15)), "head_dim must be even"),
        (dict(keys=KEYS.long()), "float dtype"),
        (dict(deltas=DELTAS.float()), "integer tensor"),
        (dict(deltas=DELTAS[:4]), r"\[tokens\] = \[5\]"),
        (dict(inv_freq=torch.ones(16)), r"\[head_dim // 2\] = \[8\]"),
        (dict(out=torch.zeros(2, 5, 8)), "must have the shape of keys"),
        (dict(out=torch.zeros(2, 5, 16, dtype=torch.int32)), "float dtype"),
        (dict(deltas=DELTAS.to("meta")), "share one device"),
    ],
    ids=["2d", "odd-head-dim", "int-keys", "float-deltas", "deltas-length", "inv-freq-length", "out-shape",
         "int-out", "mixed-devices"],
)
def test_rerotate_rejects(kwargs, message):
    args = dict(keys=KEYS, deltas=DELTAS, inv_freq=INV_FREQ, out=None) | kwargs
    with pytest.raises(ValueError, match=message):
        bk.rerotate_keys(args.pop("keys"), args.pop("deltas"), args.pop("inv_freq"), **args)


def test_deviation_rejects():
    with pytest.raises(ValueError, match="same shape"):
        bk.token_deviation(torch.zeros(2, 5, 16), torch.zeros(2, 6, 16))
    with pytest.raises(ValueError, match="3-D"):
        bk.token_deviation(torch.zeros(5, 16), torch.zeros(5, 16))
    with pytest.raises(ValueError, match="float dtype"):
        bk.token_deviation(torch.zeros(2, 5, 16, dtype=torch.int32), torch.zeros(2, 5, 16))


Q = torch.zeros(6, 3, 16)
K = torch.zeros(2, 10, 16)
POS = torch.tensor([0, 4, 9])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q_pos=torch.tensor([0, 4, 10])), r"\[0, 10\), got min 0, max 10"),
        (dict(q_pos=torch.tensor([-1, 4, 9])), r"got min -1"),
        (dict(q_pos=POS.float()), "integer tensor"),
        (dict(q_pos=POS[:2]), r"\[nq\] = \[3\]"),
        (dict(q=torch.zeros(5, 3, 16)), "multiple of kv_heads"),
        (dict(k=torch.zeros(2, 10, 8)), "head_dim 16"),
        (dict(v=torch.zeros(2, 11, 16)), r"\[kv_heads, Nk, head_dim\]"),
        (dict(k=K.half()), "share one dtype"),
        (dict(q=Q.long(), k=K.long(), v=K.long()), "float dtype"),
        (dict(v=K.to("meta")), "share one device"),
    ],
    ids=["pos-past-keys", "pos-negative", "float-pos", "pos-length", "heads-not-multiple", "head-dim-mismatch",
         "v-shape", "mixed-dtypes", "int-q", "mixed-devices"],
)
def test_attention_rejects(kwargs, message):
    args = dict(q=Q, k=K, v=K, q_pos=POS) | kwargs
    with pytest.raises(ValueError, match=message):
        bk.position_causal_attention(**args)


def test_range_check_memo_forgets_modified_and_dead_tensors():
    """Range checks remember the values they read per live, unmodified index tensor (no second read on
    later layers), and skip only checks those values satisfy."""
    from blend_kernels import _checks

    index = torch.tensor([3, 1, 2])
    _checks._remember(index, 1, 3, True)  # what a check read: min 1, max 3, unique
    assert _checks._already_checked(index, 0, 10, unique=True)
    assert _checks._already_checked(index, 1, 4, unique=False)
    assert not _checks._already_checked(index, 0, 3, unique=True)  # 3 is not below 3
    assert not _checks._already_checked(index, 2, 10, unique=True)  # 1 is below 2
    assert not _checks._already_checked(torch.tensor([3, 1, 2]), 0, 10, unique=True)  # another tensor
    index.add_(1)  # in-place change bumps the version counter
    assert not _checks._already_checked(index, 0, 10, unique=True)
    key = id(index)
    del index
    assert key not in _checks._checked


def test_range_memo_skips_inference_tensors():
    """Tensors made under torch.inference_mode keep no version counter: they are checked every time
    instead of being remembered (remembering would need the counter; on CUDA that raised)."""
    from blend_kernels._checks import _already_checked, _remember

    with torch.inference_mode():
        index = torch.arange(5)
    _remember(index, 0, 4, True)
    assert not _already_checked(index, 0, 10, True)
    plain = torch.arange(5)
    _remember(plain, 0, 4, True)
    assert _already_checked(plain, 0, 10, True)
    plain.add_(1)  # an in-place change forgets it
    assert not _already_checked(plain, 0, 10, True)


def test_an_index_proven_for_a_wider_bound_is_checked_against_a_narrower_one():
    """scatter_rows proves positions against the cache's capacity; the attention that reuses them has
    fewer keys, and must still refuse a query position past its last key."""
    q_pos = torch.tensor([9])
    bk.scatter_rows(torch.zeros(2, 16, 8), torch.ones(2, 1, 8), q_pos)
    with pytest.raises(ValueError, match=r"q_pos"):
        bk.position_causal_attention(torch.randn(2, 1, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), q_pos)


def test_a_remembered_index_changed_in_place_is_checked_again():
    """Through the public op, on CPU too: an index proven in range once is not re-read, until it changes."""
    dst, rows = torch.zeros(2, 8, 16), torch.ones(2, 3, 16)
    index = torch.tensor([1, 2, 3])
    bk.scatter_rows(dst, rows, index)
    index[2] = 8  # in place: out of range now
    with pytest.raises(ValueError, match=r"\[0, 8\), got min 1, max 8"):
        bk.scatter_rows(dst, rows, index)

