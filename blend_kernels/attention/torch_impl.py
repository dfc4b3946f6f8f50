"""Torch path of `position_causal_attention`: the production path on CPU, so it is blocked for speed.

Queries are sorted by position and split into a few blocks; a block attends only keys
0..max_pos_in_block, through one SDPA call with a boolean mask. With ~15% of tokens selected and
spread over the prompt, the blocks skip about half the score matrix that one dense masked call
would compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Measured on 2 CPU threads (q_heads 9, kv_heads 3, head_dim 64, Nk 6,100, nq ~900), time relative
# to one dense masked SDPA call: 4 blocks 0.56x, 8 blocks 0.37-0.41x, 12-16 blocks 0.34-0.39x.
# 8, because every extra SDPA call costs a lot when OpenMP threads share their cores with another
# busy process (there, unless OMP_WAIT_POLICY=PASSIVE, 8 blocks already run 1.8x slower than dense).
# Under ~64 queries a block no longer fills SDPA's tiles.
MAX_BLOCKS = 8
MIN_BLOCK_QUERIES = 64


def query_blocks(num_queries: int, max_blocks: int = MAX_BLOCKS) -> list[tuple[int, int]]:
    """Split sorted query rows 0..num_queries into up to `max_blocks` near-equal [start, end) ranges."""
    blocks = max(1, min(max_blocks, num_queries // MIN_BLOCK_QUERIES))
    bounds = [round(i * num_queries / blocks) for i in range(blocks + 1)]
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def position_causal_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
    *, key_bias: torch.Tensor | None = None, bias_from: int = 0, window: int | None = None,
    softcap: float | None = None, max_blocks: int = MAX_BLOCKS,
) -> torch.Tensor:
    """q: [q_heads, nq, head_dim]; k, v: [kv_heads, Nk, head_dim]; q_pos: int64 [nq], each in [0, Nk);
    key_bias: fp32 [1 or q_heads, Nk] added to the logits of queries at positions >= bias_from;
    window: a query at p sees keys p - window < j <= p; softcap: tanh logit cap
    -> [q_heads, nq, head_dim] in q.dtype."""
    if softcap is not None:
        # SDPA cannot cap logits. Only Gemma 2 asks for it; it takes the explicit math.
        from .reference import position_causal_attention_reference

        bias = key_bias[:, :k.shape[1]] if key_bias is not None else None  # the cache's bias is wider
        return position_causal_attention_reference(q, k, v, q_pos, scale, bias, bias_from, window,
                                                   softcap).to(q.dtype)
    q_heads, num_queries, head_dim = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_queries == 0:
        return out
    if q.device.type == "cpu" and q.dtype != torch.float32:
        # CPU SDPA would keep half-precision softmax statistics; the contract is fp32 softmax.
        q, k, v = q.float(), k.float(), v.float()

    pos_sorted, order = torch.sort(q_pos)
    q_sorted = q.index_select(1, order)
    blocks = query_blocks(num_queries, max_blocks)
    # One host read of the block ends (a sync on CUDA, where this path only runs when forced).
    last_pos = pos_sorted[[end - 1 for _, end in blocks]].tolist()
    first_pos = pos_sorted[[start for start, _ in blocks]].tolist()
    outputs = []
    for (start, end), min_pos, max_pos in zip(blocks, first_pos, last_pos):
        num_keys = max_pos + 1
        # With a sliding window the block's keys start where its first query's window does.
        lo = 0 if window is None else max(0, min_pos - window + 1)
        keys = torch.arange(lo, num_keys, device=q.device)[None, :]
        mask = keys <= pos_sorted[start:end, None]
        if window is not None:
            mask &= keys > pos_sorted[start:end, None] - window
        if key_bias is not None and max_pos >= bias_from:
            # The bias rides in SDPA's float mask, built in one pass: SDPA turns a boolean mask into
            # a float one of the same size anyway, so a bias shared by all heads costs nothing extra
            # (a per-head bias makes the mask, and its traffic, q_heads times larger). Blocks whose
            # queries all sit before bias_from keep the plain boolean mask.
            bias = key_bias[:, None, lo:num_keys].to(q.dtype)
            if bias_from > int(pos_sorted[start]):
                bias = bias * (pos_sorted[start:end] >= bias_from)[None, :, None]
            mask = torch.where(mask[None], bias, float("-inf"))[None]
        # enable_gqa maps query head h to kv head h // group without copying K/V. The inputs are
        # 4-D on purpose: torch's CPU flash kernel takes only [batch, heads, tokens, dim]; 3-D
        # inputs fall back to the math path (measured ~3x slower at this shape).
        outputs.append(F.scaled_dot_product_attention(
            q_sorted[None, :, start:end], k[None, :, lo:num_keys], v[None, :, lo:num_keys], attn_mask=mask,
            scale=scale, enable_gqa=group > 1,
        )[0])
    out.index_copy_(1, order, torch.cat(outputs, dim=1).to(out.dtype))
    return out
