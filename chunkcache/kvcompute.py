"""Computing the KV tensors that go into the store: the prompt prefix and each chunk after it (or after it
and a context: a context-enriched entry)."""
from __future__ import annotations

import torch

from store import QuantizedKV, quantize_kv

from .forward import forward_tokens
from .kvcache import KVCache, new_cache
from .models import LoadedModel
from .rope import rerotate_layers

# int8 stands for the KIVI-style QuantizedKV entry (int8 codes plus per-channel K, per-token V scales).
KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}


def kv_dtype_of(name: str) -> torch.dtype:
    return KV_DTYPES[name]


def prefix_cache(lm: LoadedModel, prefix_ids, capacity: int) -> KVCache:
    """A cache holding the prefix at positions 0..P-1, with room for `capacity` rows in all."""
    cache = new_cache(lm, max(capacity, len(prefix_ids)))
    ids = torch.tensor(prefix_ids, dtype=torch.long)
    forward_tokens(lm, cache, ids, torch.arange(len(prefix_ids)))
    return cache


def extract_kv(cache: KVCache, start: int, end: int, kv_dtype: torch.dtype) -> torch.Tensor | QuantizedKV:
    """[2, layers, kv_heads, end-start, head_dim] on CPU in the store dtype (int8: a QuantizedKV)."""
    kv = torch.stack((cache.k[:, :, start:end], cache.v[:, :, start:end]))
    if kv_dtype == torch.int8:
        return quantize_kv(kv).to("cpu")  # quantized where the cache lives: only codes and stats move
    return kv.to("cpu", kv_dtype)


def dense_kv(kv: torch.Tensor | QuantizedKV) -> torch.Tensor:
    """The KV as the pipeline places it: a QuantizedKV dequantized (float32), exactly as a store read returns it."""
    return kv.dequantize(torch.float32) if isinstance(kv, QuantizedKV) else kv


def chunk_kv(lm: LoadedModel, cache: KVCache, prefix_len: int, chunk_ids,
             kv_dtype: torch.dtype) -> torch.Tensor | QuantizedKV:
    """The chunk's K/V computed right after the prefix (positions P..P+n-1), as stored.

    `cache` holds the prefix in rows 0..P-1; rows after it are scratch and get overwritten.
    """
    n = len(chunk_ids)
    if prefix_len + n > cache.capacity:
        raise ValueError(f"chunk of {n} tokens does not fit the scratch cache ({cache.capacity - prefix_len} rows)")
    forward_tokens(lm, cache, torch.tensor(chunk_ids, dtype=torch.long), torch.arange(prefix_len, prefix_len + n))
    return extract_kv(cache, prefix_len, prefix_len + n, kv_dtype)


def context_chunk_kv(lm: LoadedModel, cache: KVCache, prefix_len: int, context_ids, chunk_ids,
                     kv_dtype: torch.dtype, context_kv: torch.Tensor | None = None) -> torch.Tensor | QuantizedKV:
    """The chunk's K/V computed after the prefix and `context_ids` (a context-enriched entry), stored as a plain
    entry is: its keys re-rotated to positions P..P+n-1, so the pipeline places both kinds alike.

    `cache` holds the prefix in rows 0..P-1; rows after it are scratch and get overwritten. `context_kv`: the
    context's own KV after the prefix ([2, layers, kv_heads, m, head_dim], e.g. its stored plain entry), placed
    instead of computed, so only the chunk's tokens run.
    """
    m, n = len(context_ids), len(chunk_ids)
    if prefix_len + m + n > cache.capacity:
        raise ValueError(f"context of {m} and chunk of {n} tokens do not fit the scratch cache "
                         f"({cache.capacity - prefix_len} rows)")
    if context_kv is None:  # the context and the chunk in one pass
        ids = torch.tensor(list(context_ids) + list(chunk_ids), dtype=torch.long)
        forward_tokens(lm, cache, ids, torch.arange(prefix_len, prefix_len + m + n))
    else:
        cache.k[:, :, prefix_len:prefix_len + m].copy_(context_kv[0])
        cache.v[:, :, prefix_len:prefix_len + m].copy_(context_kv[1])
        forward_tokens(lm, cache, torch.tensor(list(chunk_ids), dtype=torch.long),
                       torch.arange(prefix_len + m, prefix_len + m + n))
    rows = slice(prefix_len + m, prefix_len + m + n)
    keys, values = cache.k[:, :, rows].clone(), cache.v[:, :, rows].clone()
    # RoPE composes: rotating by -m moves every key to where a plain entry's sits (DESIGN.md section 3).
    plain = slice(prefix_len, prefix_len + n)
    rerotate_layers(keys, torch.full((n,), -m, device=keys.device), lm.ropes, out=cache.k[:, :, plain])
    cache.v[:, :, plain] = values
    return extract_kv(cache, prefix_len, prefix_len + n, kv_dtype)
