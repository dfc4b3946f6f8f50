"""Computing the KV tensors that go into the store: the prompt prefix and each chunk after it."""
from __future__ import annotations

import torch

from store import QuantizedKV, quantize_kv

from .forward import forward_tokens
from .kvcache import KVCache, new_cache
from .models import LoadedModel

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
