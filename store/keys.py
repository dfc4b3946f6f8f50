"""The chunk key: a content hash naming one chunk's KV cache in the store."""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

from .codec import KV_DTYPE_NAMES, KV_FORMAT_VERSION

_DOMAIN = b"chunkcache/chunk_key"
_CONTEXT = b"context"  # tags the optional context field, so no plain key can collide with it


def chunk_key(
    model_fingerprint: str,
    prefix_ids: Sequence[int],
    token_ids: Sequence[int],
    *,
    kv_dtype: str,
    namespace: str = "",
    context_ids: Sequence[int] = (),
    format_version: int = KV_FORMAT_VERSION,
) -> bytes:
    """Key of a chunk's KV cache: changes whenever the stored tensors would.

    Every field is length-prefixed, so no two different inputs share an encoding (e.g. prefix [1, 2] +
    chunk [3] differs from prefix [1] + chunk [2, 3]).

    Args:
        model_fingerprint: identity of the model (architecture, weights, compute dtype).
        prefix_ids: token ids of the fixed prompt prefix the chunk was computed after.
        token_ids: the chunk's own token ids.
        kv_dtype: storage dtype name, one of "float16", "bfloat16", "float32", "int8".
        namespace: tenant salt; "" means the shared cache. Separate namespaces never share entries, so one
            tenant cannot learn through timing which chunks another used.
        context_ids: token ids of the context the chunk was computed after, between the prefix and the chunk
            (a context-enriched entry: chunkcache/context.py); its keys are stored at the positions right after
            the prefix, as a plain entry's. Empty (a plain entry) adds no field, so plain keys are unchanged.
        format_version: KV byte-format version the entry is written in.

    Returns:
        32 raw bytes (blake2b-256). Show `key.hex()[:16]` to users.
    """
    if not isinstance(model_fingerprint, str) or not isinstance(namespace, str):
        raise ValueError("chunk_key: model_fingerprint and namespace must be str")
    if kv_dtype not in KV_DTYPE_NAMES:
        raise ValueError(f"chunk_key: unknown kv_dtype {kv_dtype!r}; use one of {sorted(KV_DTYPE_NAMES)}")
    h = hashlib.blake2b(digest_size=32)
    for field in (
        _DOMAIN,
        struct.pack("<q", format_version),
        model_fingerprint.encode("utf-8"),
        kv_dtype.encode("utf-8"),
        namespace.encode("utf-8"),
        _pack_ids(prefix_ids, "prefix_ids"),
        _pack_ids(token_ids, "token_ids"),
        *((_CONTEXT, _pack_ids(context_ids, "context_ids")) if len(context_ids) else ()),
    ):
        h.update(struct.pack("<Q", len(field)))
        h.update(field)
    return h.digest()


def _pack_ids(ids: Sequence[int], name: str) -> bytes:
    """Token ids as little-endian int64s; accepts lists, numpy arrays and 1-D tensors."""
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    try:
        return struct.pack(f"<{len(values)}q", *values)
    except struct.error as e:
        raise ValueError(f"chunk_key: {name} must be a flat sequence of int64 token ids ({e})") from e
