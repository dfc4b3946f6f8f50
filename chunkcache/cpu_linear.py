"""Linear layers with oneDNN pre-packed weights, for fp32 models on CPU.

torch's default CPU path for `F.linear` repacks the weight on every call; oneDNN with the weight packed
once at load runs the same fp32 product 1.8-2.7x faster on this project's CPUs (1536x576 weight: 73 -> 40 us
at one row, 157 -> 57 us at 8, 8.4 -> 3.7 ms at 1,000; bench figures in docs/SERVER.md), which is what
vLLM-CPU's kernels get too. Results equal torch's to fp32 rounding (about 1e-6 relative), so stored KVs
and fingerprints do not change. The original weight stays (tied embeddings and fingerprints read it): the
packed copy doubles the linears' memory (1.5x with bfloat16 weights).

`linear_dtype="bfloat16"` packs the weights in bf16 instead: each product rounds its input rows to bf16,
accumulates in fp32 and rounds its output to bf16, which is widened back to fp32 for the rest (norms,
residuals, attention and the KV cache are fp32 tensors, holding bf16-rounded projections). A decode
step is bound by reading the weights, so half the bytes make it ~1.2x faster (28.3 -> 22.9 ms a token
for SmolLM2-135M at ~640 tokens, bench/decode.py); KL to the fp32 model's full prefill is ~5e-4 on
MuSiQue dev (README "Single-stream decode").
KVs differ from fp32's, so the model fingerprint records it (models.model_fingerprint).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .config import LINEAR_DTYPES

log = logging.getLogger(__name__)
TORCH_DTYPES = {name: getattr(torch, name) for name in LINEAR_DTYPES}


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_bf16_available() -> bool:
    """oneDNN's bf16 products need AVX-512 (BW, VL, DQ) or AMX; elsewhere packing a bf16 weight raises."""
    return onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward through oneDNN with the weight packed once (CPU), in fp32 or bf16; inputs
    and outputs stay in the model's fp32."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), None),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.dtype == x.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.packed.dtype), self.packed, None, "none", [], "").to(x.dtype)
        return out if self.bias is None else out.add_(self.bias)  # the bias added in fp32, not rounded to bf16


def pack_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Swap every fp32 CPU `nn.Linear` of `model` for a PackedLinear with `dtype` weights; returns how many
    (0 without oneDNN)."""
    if not onednn_available():
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, dtype))
    return len(swaps)
