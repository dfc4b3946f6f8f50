"""What a request read from the store, and what its `documents` may write there.

`cached_tokens` counts only KV rows actually read from the store: a chunk missed and computed during
the request is not cached, even when its rows are then reused in place rather than recomputed.

Writes through request `documents` are charged to the caller's namespace (a tenant), in the KV bytes
they take, against `ChunkCacheConfig.document_quota_bytes`; what does not fit is computed for the
request only. Ingested chunks are the store owner's and are never charged.
"""
from __future__ import annotations

from typing import Sequence

import torch

from store.codec import payload_bytes

from .blend import PromptLayout


def cached_token_count(layout: PromptLayout, kept_positions: torch.Tensor, chunks_read: Sequence[bool],
                       prefix_read: bool) -> int:
    """Prompt tokens whose KV was read from the store and not recomputed.

    Args:
        layout: where the prefix, chunks and suffix sit.
        kept_positions: int64 [n] positions computed through the last layer (their stored KV was replaced).
        chunks_read: per chunk, whether its KV was read from the store (False: computed this request).
        prefix_read: whether the prefix's KV was read from the store.
    """
    read = torch.zeros(layout.num_tokens, dtype=torch.bool)
    if prefix_read:
        read[:layout.prefix_len] = True
    for start, n, was_read in zip(layout.chunk_starts, layout.chunk_lens, chunks_read):
        if was_read:
            read[start:start + n] = True
    read[kept_positions.to("cpu", torch.long)] = False
    return int(read.sum())


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """Stored KV payload of one token: K and V, every layer and KV head, in the store's dtype (int8: the codes
    and the token's V scale and minimum, without the per-chunk K stats; `kv_entry_bytes` counts those)."""
    if kv_dtype == torch.int8:
        return 2 * num_layers * num_kv_heads * (head_dim + 4)
    return 2 * num_layers * num_kv_heads * head_dim * kv_dtype.itemsize


def kv_entry_bytes(num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """Stored KV payload of a chunk of `num_tokens` tokens as `kv_dtype` (a config name), as the store counts it."""
    return payload_bytes((2, num_layers, num_kv_heads, num_tokens, head_dim), kv_dtype)
