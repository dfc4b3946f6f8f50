"""Triton flash-style position-causal attention with GQA.

Grid: (query blocks, q_heads). The launcher sorts queries by position, so a query block covers a
narrow position range; the program gathers its query rows through `order`, runs an online softmax
over key blocks 0..max position of the block (later key blocks are never loaded), masks key j > q_pos
per row, and writes each output row back to its original place (no unsort pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import is_interpreted, next_pow2, require_launchable

LOG2E = 1.4426950408889634


@triton.jit
def _position_causal_attention_kernel(
    Q, K, V, O, ORDER, POS, BIAS,
    num_queries, num_keys, head_dim, group, qk_scale, bias_from, window,
    sqh, sqn, sqd,
    skh, skn, skd,
    svh, svn, svd,
    soh, son, sod,
    sbh, sbn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    # Blocks with the latest positions have the most keys: start them first to balance the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = (head // group).to(tl.int64)
    head = head.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_queries
    rows = tl.load(ORDER + offs_m, mask=m_ok, other=0).to(tl.int64)
    # Padding rows take position 0: they see key 0, so their softmax stays finite (never stored).
    pos = tl.load(POS + offs_m, mask=m_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    q = tl.load(Q + head * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + kv_head * skh
    v_base = V + kv_head * svh
    if HAS_BIAS:
        b_base = BIAS + head * sbh
        takes_bias = pos[:, None] >= bias_from
    hi = tl.max(pos, axis=0) + 1
    lo = 0
    if HAS_WINDOW:
        # Keys before the earliest real row's window are never seen by this block.
        lo = tl.maximum(tl.min(tl.where(m_ok, pos, hi - 1), axis=0) - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < num_keys
        k = tl.load(k_base + offs_n.to(tl.int64)[None, :] * skn + offs_d[:, None] * skd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            # The per-key log scale, in the kernel's base-2 logits.
            b = tl.load(b_base + offs_n.to(tl.int64) * sbn, mask=n_ok, other=0.0)
            s = s + tl.where(takes_bias, b[None, :] * 1.4426950408889634, 0.0)  # LOG2E
        visible = offs_n[None, :] <= pos[:, None]
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet (its window starts in a later block) keeps
        # m = -inf; subtracting 0 instead keeps alpha and p at 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + head * soh + rows[:, None] * son + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _block_sizes(block_d: int, element_size: int) -> tuple[int, int, int, int]:
    """-> BLOCK_M, BLOCK_N, num_warps, num_stages.

    NOTE: untuned guesses (written without a GPU; bench/kernels.py measures them). BLOCK_M stays at
    64 so the ~600-2,400 queries of a 4k-16k prompt still make several programs per SM; the K/V
    tiles times the pipeline stages must fit shared memory (fp32 tiles are twice as big).
    """
    if block_d <= 64:
        return 64, 64, 4, 3
    if block_d <= 128:
        return (64, 64, 4, 3) if element_size == 2 else (64, 32, 4, 2)
    return 64, 32, 8, 2


def position_causal_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
    *, key_bias: torch.Tensor | None = None, bias_from: int = 0, window: int | None = None,
    block_m: int | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """q: [q_heads, nq, head_dim]; k, v: [kv_heads, Nk, head_dim] (any strides); q_pos: int [nq],
    each in [0, Nk) (checked by the caller); key_bias: fp32 [1 or q_heads, Nk], added to the logits
    of queries at positions >= bias_from; window: a query at p sees keys p - window < j <= p
    -> [q_heads, nq, head_dim] in q.dtype."""
    require_launchable(_position_causal_attention_kernel, q=q, k=k, v=v, q_pos=q_pos)
    q_heads, num_queries, head_dim = q.shape
    kv_heads, num_keys, _ = k.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_queries == 0:
        return out
    pos_sorted, order = torch.sort(q_pos)
    # tl.dot needs every dim >= 16; the padded columns load as zeros and are never stored.
    block_d = next_pow2(head_dim, 16)
    auto_m, auto_n, num_warps, num_stages = _block_sizes(block_d, q.element_size())
    # A block taller than the whole query set is only padding.
    block_m = block_m or min(auto_m, next_pow2(num_queries, 16))
    block_n = block_n or auto_n
    # fp32 inputs ask for true fp32 products (not TF32) to keep the fp32 contract. The CPU
    # interpreter (triton 3.9) multiplies bf16 tiles wrongly, so there the tiles go to fp32.
    upcast = q.dtype == torch.bfloat16 and is_interpreted(_position_causal_attention_kernel)
    precision = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    grid = (triton.cdiv(num_queries, block_m), q_heads)
    has_bias = key_bias is not None
    bias = key_bias if has_bias else q  # never read without HAS_BIAS
    # A one-row bias serves every head: stride 0 over heads.
    bias_strides = ((0 if key_bias.shape[0] == 1 else key_bias.stride(0)), key_bias.stride(1)) if has_bias else (0, 0)
    _position_causal_attention_kernel[grid](
        q, k, v, out, order, pos_sorted.to(torch.int32), bias,
        num_queries, num_keys, head_dim, q_heads // kv_heads, scale * LOG2E, int(bias_from), int(window or 0),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias_strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast, PRECISION=precision, HAS_BIAS=has_bias, HAS_WINDOW=window is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
