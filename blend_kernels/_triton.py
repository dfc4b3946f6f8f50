"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import torch


def is_interpreted(kernel: object) -> bool:
    """True when triton decorated `kernel` for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def require_launchable(kernel: object, **tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; interpreted ones run on CPU tensors too."""
    for name, t in tensors.items():
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and is_interpreted(kernel):
            continue
        raise ValueError(
            f"the triton backend got {name} on {t.device}: compiled Triton kernels need CUDA tensors. "
            "Use the torch backend (set_backend('torch') or CHUNKCACHE_KERNELS=torch), or set "
            "TRITON_INTERPRET=1 before blend_kernels loads its kernels to run them on CPU"
        )


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())
