"""The public kernel functions: check inputs, pick the backend, call the torch path or the Triton launcher.

Triton launchers are imported on first use, so importing blend_kernels never decorates a kernel
(triton decides compiler vs interpreter at that moment; see backend.py).
"""

from __future__ import annotations

import importlib

import torch

from . import backend
from ._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    describe,
    require_dim,
    require_float,
    require_in_range,
    require_int,
    require_same_device,
    require_tensor,
)
from .attention.torch_impl import position_causal_attention_torch
from .deviation.torch_impl import token_deviation_torch
from .rope.torch_impl import rerotate_keys_torch
from .scatter.torch_impl import scatter_rows_torch
from .selection.topk import select_tokens_torch


def _launcher(module: str, name: str):
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except ImportError as exc:
        raise ValueError(
            f"the triton backend needs the `triton` package ({exc}); install it or use set_backend('torch')"
        ) from exc


def rerotate_keys(
    keys: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Move post-RoPE keys by a per-token position shift (R(p + d) = R(d) R(p)).

    Args:
        keys: [..., kv_heads, tokens, head_dim] post-RoPE keys, fp16/bf16/fp32 (leading dims such
            as layers optional; any strides).
        deltas: int [tokens], new position minus old position per token (chunks with different
            offsets go in one call).
        inv_freq: [head_dim // 2] RoPE inverse frequencies (used in fp32).
        out: optional destination shaped like keys, any float dtype, any strides (e.g.
            cache_k[:, :, s:e, :]); may be keys itself for an in-place rotation. It must not
            partially overlap keys.
    Returns:
        out, or a new tensor of keys.dtype. Math in fp32; delta 0 returns the input exactly.
    """
    require_tensor("keys", keys)
    require_tensor("deltas", deltas)
    require_tensor("inv_freq", inv_freq)
    require_float("keys", keys)
    if keys.dim() < 3:
        raise ValueError(f"keys ({describe(keys)}) must be [..., kv_heads, tokens, head_dim]")
    tokens, head_dim = keys.shape[-2], keys.shape[-1]
    if head_dim == 0 or head_dim % 2:
        raise ValueError(f"keys head_dim must be even and > 0 for RoPE, got {head_dim} ({describe(keys)})")
    require_int("deltas", deltas)
    if deltas.shape != (tokens,):
        raise ValueError(f"deltas ({describe(deltas)}) must be [tokens] = [{tokens}] to match keys ({describe(keys)})")
    require_float("inv_freq", inv_freq, FLOAT_DTYPES + (torch.float64,))
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(
            f"inv_freq ({describe(inv_freq)}) must be [head_dim // 2] = [{head_dim // 2}] for keys ({describe(keys)})"
        )
    if out is None:
        device = require_same_device(keys=keys, deltas=deltas, inv_freq=inv_freq)
        out = torch.empty(keys.shape, dtype=keys.dtype, device=keys.device)
    else:
        require_tensor("out", out)
        require_float("out", out, FLOAT_DTYPES + (torch.float64,))
        if out.shape != keys.shape:
            raise ValueError(f"out ({describe(out)}) must have the shape of keys ({describe(keys)})")
        device = require_same_device(keys=keys, deltas=deltas, inv_freq=inv_freq, out=out)
    inv_freq = inv_freq.to(torch.float32)
    if backend.resolve(device) == "triton":
        return _launcher("rope.kernel", "rerotate_keys_triton")(keys, deltas, inv_freq, out)
    return rerotate_keys_torch(keys, deltas, inv_freq, out)


def token_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Per-token squared L2 distance between fresh and cached K (or V) rows.

    Args:
        fresh, cached: [kv_heads, tokens, head_dim], any float dtypes (cached may be a strided view).
    Returns:
        fp32 [tokens]: sum over heads and head_dim of (fresh - cached)^2, computed in fp32.
    """
    require_tensor("fresh", fresh)
    require_tensor("cached", cached)
    require_dim("fresh", fresh, 3, "[kv_heads, tokens, head_dim]")
    require_dim("cached", cached, 3, "[kv_heads, tokens, head_dim]")
    require_float("fresh", fresh)
    require_float("cached", cached)
    if fresh.shape != cached.shape:
        raise ValueError(f"fresh ({describe(fresh)}) and cached ({describe(cached)}) must have the same shape")
    device = require_same_device(fresh=fresh, cached=cached)
    if backend.resolve(device) == "triton":
        return _launcher("deviation.kernel", "token_deviation_triton")(fresh, cached)
    return token_deviation_torch(fresh, cached)


def select_tokens(scores: torch.Tensor, num_select: int, always: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the tokens to recompute.

    Args:
        scores: fp32 [tokens] (e.g. token_deviation's output), no NaN.
        num_select: how many tokens outside `always` to pick, highest score first, ties to the
            lower index; more than there are candidates picks them all.
        always: optional bool [tokens], tokens included regardless of score (the question suffix).
    Returns:
        int64 [n], sorted ascending and unique: all `always` tokens plus the picked others.
    """
    require_tensor("scores", scores)
    require_dim("scores", scores, 1, "[tokens]")
    require_float("scores", scores, FLOAT_DTYPES + (torch.float64,))
    if isinstance(num_select, bool) or not isinstance(num_select, int):
        raise ValueError(f"num_select must be an int, got {num_select!r}")
    if num_select < 0:
        raise ValueError(f"num_select must be >= 0, got {num_select}")
    if always is not None:
        require_tensor("always", always)
        if always.dtype != torch.bool or always.shape != scores.shape:
            raise ValueError(
                f"always ({describe(always)}) must be a bool mask shaped like scores ({describe(scores)})"
            )
        require_same_device(scores=scores, always=always)
    # A NaN would sort above every real score and be picked first; one sync, once per request.
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"scores ({describe(scores)}) contain NaN; fix the deviation inputs")
    return select_tokens_torch(scores, num_select, always)


def scatter_rows(dst: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
    """In place: dst[:, index, :] = rows (cast to dst.dtype).

    Args:
        dst: [kv_heads, N, head_dim], any strides (e.g. a slice of a bigger cache buffer).
        rows: [kv_heads, n, head_dim].
        index: int [n], unique, each in [0, N). On CUDA the range/uniqueness check costs one sync
            the first time a given index tensor is seen (later layers reusing it pay nothing).
    """
    if not _scatter_metadata_ok(dst, rows, index):
        _check_scatter_metadata(dst, rows, index)  # raises, naming what is wrong
    require_in_range("index", index, 0, dst.shape[1], unique=True)
    index = index.to(torch.int64).contiguous()
    if backend.resolve(dst.device, "scatter_rows") == "triton":
        _launcher("scatter.kernel", "scatter_rows_triton")(dst, rows, index)
    else:
        scatter_rows_torch(dst, rows, index)


_SCATTER_FLOATS = frozenset(FLOAT_DTYPES + (torch.float64,))
_INTS = frozenset(INT_DTYPES)


def _scatter_metadata_ok(dst, rows, index) -> bool:
    """The common case in one expression: the query path calls scatter_rows twice per layer per request
    (per decode step too), where the step-by-step checks below cost ~15 us of Python a call."""
    return (isinstance(dst, torch.Tensor) and isinstance(rows, torch.Tensor) and isinstance(index, torch.Tensor)
            and dst.dim() == 3 and index.dim() == 1 and dst.dtype in _SCATTER_FLOATS
            and rows.dtype in _SCATTER_FLOATS and index.dtype in _INTS
            and rows.shape == (dst.shape[0], index.shape[0], dst.shape[2])
            and dst.device == rows.device == index.device)


def _check_scatter_metadata(dst, rows, index) -> None:
    require_tensor("dst", dst)
    require_tensor("rows", rows)
    require_tensor("index", index)
    require_dim("dst", dst, 3, "[kv_heads, N, head_dim]")
    require_dim("rows", rows, 3, "[kv_heads, n, head_dim]")
    require_float("dst", dst, tuple(_SCATTER_FLOATS))
    require_float("rows", rows, tuple(_SCATTER_FLOATS))
    require_int("index", index)
    if index.dim() != 1 or rows.shape != (dst.shape[0], index.shape[0], dst.shape[2]):
        raise ValueError(
            f"rows ({describe(rows)}) must be [kv_heads, n, head_dim] = [{dst.shape[0]}, {index.numel()}, "
            f"{dst.shape[2]}] for dst ({describe(dst)}) and index ({describe(index)})"
        )
    require_same_device(dst=dst, rows=rows, index=index)
    raise AssertionError(f"_scatter_metadata_ok refused inputs that every check accepts: dst ({describe(dst)}), "
                         f"rows ({describe(rows)}), index ({describe(index)})")


def position_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, *, scale: float | None = None,
    key_bias: torch.Tensor | None = None, bias_from: int = 0, window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of selected queries where query i sees exactly keys 0..q_pos[i] (or its window).

    Args:
        q: [q_heads, nq, head_dim].
        k, v: [kv_heads, Nk, head_dim], key j at position j; q_heads % kv_heads == 0 (GQA: query
            head h reads kv head h // (q_heads // kv_heads)).
        q_pos: int [nq] query positions, any order, each in [0, Nk). On CUDA the range check costs
            one sync the first time a given q_pos tensor is seen.
        scale: softmax scale, default head_dim ** -0.5.
        key_bias: optional fp32 [1 or q_heads, Nk], added to the logits of every query at a position
            >= bias_from: log(S) multiplies a key's attention weight by S before renormalising (the
            APE-style scale on reused chunks, see chunkcache/blend.py). None: plain attention.
        bias_from: the first query position that takes key_bias.
        window: sliding-window size; query i then sees keys q_pos[i] - window < j <= q_pos[i]
            (Hugging Face's `sliding_window` convention). None: all earlier keys.
        softcap: logits -> softcap * tanh(logits / softcap) (Gemma 2); always the torch path.
    Returns:
        [q_heads, nq, head_dim] in q.dtype; softmax in fp32.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("q_pos", q_pos)):
        require_tensor(name, t)
    require_dim("q", q, 3, "[q_heads, nq, head_dim]")
    require_dim("k", k, 3, "[kv_heads, Nk, head_dim]")
    require_dim("v", v, 3, "[kv_heads, Nk, head_dim]")
    require_float("q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; cast k and v")
    q_heads, num_queries, head_dim = q.shape
    kv_heads, num_keys, _ = k.shape
    if v.shape != k.shape or k.shape[2] != head_dim or head_dim == 0:
        raise ValueError(
            f"k ({describe(k)}) and v ({describe(v)}) must both be [kv_heads, Nk, head_dim] with the "
            f"head_dim {head_dim} of q ({describe(q)})"
        )
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(
            f"q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads}) for grouped-query attention"
        )
    require_int("q_pos", q_pos)
    if q_pos.shape != (num_queries,):
        raise ValueError(f"q_pos ({describe(q_pos)}) must be [nq] = [{num_queries}] to match q ({describe(q)})")
    device = require_same_device(q=q, k=k, v=v, q_pos=q_pos)
    require_in_range("q_pos", q_pos, 0, num_keys)
    scale = head_dim**-0.5 if scale is None else float(scale)
    q_pos = q_pos.to(torch.int64)
    if key_bias is not None:
        require_tensor("key_bias", key_bias)
        if key_bias.dtype != torch.float32 or key_bias.dim() != 2 or key_bias.shape[0] not in (1, q_heads) \
                or key_bias.shape[1] < num_keys:
            raise ValueError(f"key_bias ({describe(key_bias)}) must be float32 [1 or q_heads={q_heads}, Nk >= "
                             f"{num_keys}]")
        require_same_device(q=q, key_bias=key_bias)
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be a positive number of keys, got {window}")
    if backend.resolve(device) == "triton" and softcap is None:
        return _launcher("attention.kernel", "position_causal_attention_triton")(
            q, k, v, q_pos, scale, key_bias=key_bias, bias_from=bias_from, window=window)
    return position_causal_attention_torch(q, k, v, q_pos, scale, key_bias=key_bias, bias_from=bias_from,
                                           window=window, softcap=softcap)
