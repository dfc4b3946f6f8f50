"""Which implementation runs a kernel call: the Triton kernel or the torch path.

Resolution order, checked on every call (a dict lookup, so tests may flip it freely):
1. an explicit override from `set_backend(...)` / `use_backend(...)` (the pipeline config injects it);
2. the `CHUNKCACHE_KERNELS` environment variable: `auto` (default) | `torch` | `triton`;
3. `auto`: CUDA tensors go to Triton, everything else to torch; except the kernels listed in
   `TORCH_ON_CUDA`, whose torch path measured faster on a GPU (bench/results/gpu/).

Forcing `triton` on CPU tensors runs the Triton interpreter, which needs `TRITON_INTERPRET=1` set
before blend_kernels first loads a kernel module (triton picks interpreter vs compiler when a
kernel is decorated); the launchers raise a ValueError that says so otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

ENV_VAR = "CHUNKCACHE_KERNELS"
BACKENDS = ("auto", "torch", "triton")

_override: str | None = None
# Measured on an H200 (bench/results/gpu/kernels-2026-11-29.json): torch's index_copy_ writes the
# rows in 0.026-0.030 ms where the Triton kernel takes 0.051-0.055 ms, mostly its launch (~60 us of
# Python per call, twice per layer per decode step). `auto` takes torch there; `triton` still forces it.
TORCH_ON_CUDA = frozenset({"scatter_rows"})


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} = {name!r} is not a kernel backend; use one of {BACKENDS}")
    return name


def set_backend(name: str | None) -> None:
    """Force `name` ('auto' | 'torch' | 'triton') for all later calls; None returns to the env var."""
    global _override
    _override = None if name is None else _check_name(name, "set_backend(name)")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of `set_backend`; restores the previous override on exit."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def get_backend() -> str:
    """The configured backend name ('auto' | 'torch' | 'triton'), before looking at any tensor."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def resolve(device: torch.device, kernel: str = "") -> str:
    """'torch' or 'triton' for `kernel`'s tensors on `device`."""
    name = get_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" and kernel not in TORCH_ON_CUDA else "torch"
    return name
