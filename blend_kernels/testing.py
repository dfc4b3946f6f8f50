"""Helpers for the kernel tests (tests/test_kernels_*.py): interpreter setup, tolerances, comparison.

Import this module before anything imports a kernel module: `interpret_without_cuda()` sets
TRITON_INTERPRET=1 on machines without CUDA so the Triton kernels run on CPU tensors, and leaves
CUDA machines compiling real kernels.
"""

from __future__ import annotations

import os

import torch

# (atol, rtol) of a dtype's result against the fp32 reference: a few ulps of the output dtype,
# since every path computes in fp32 and rounds once (attention also rounds p for its second dot).
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpret_without_cuda() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_runs_on_cpu() -> bool:
    """True when Triton kernels will be interpreted, so CPU tensors can take the triton backend."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def assert_equal_after_cast(actual: torch.Tensor, expected: torch.Tensor, *, interpreted: bool) -> None:
    """Exact, except that the CPU interpreter (triton 3.9) rounds fp32 -> bf16 toward zero where GPUs
    and torch round to nearest even: there allow one bf16 ulp."""
    if interpreted and actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual.float(), expected.float(), atol=0.0, rtol=2.0**-7)
    else:
        assert torch.equal(actual, expected)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare in fp32 with `dtype`'s tolerance (times `scale` for longer accumulations)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.to(torch.float32).cpu(), expected.to(torch.float32).cpu(), atol=atol * scale, rtol=rtol * scale
    )
