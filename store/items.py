"""What every store backend writes for a chunk, encoded the same way: the checks on a `put_chunks` item,
its KV entry and embedding record, and the payload/token totals (store/README.md has the formats)."""
from __future__ import annotations

import numpy as np
import torch

from .codec import QuantizedKV, decode_kv, encode_kv, entry_sizes
from .errors import CorruptEntryError
from .records import EMB_MAGIC, META_MAGIC, decode_emb, decode_meta, encode_emb, encode_meta, is_checked

KEY_BYTES = 32


def unpack_item(item, index: int):
    if not isinstance(item, (tuple, list)) or len(item) != 4:
        raise ValueError(f"put_chunks item {index}: expected (key, kv, meta, embedding), got {type(item).__name__}")
    key, kv, meta, emb = item
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"put_chunks item {index}: key must be {KEY_BYTES} bytes from chunk_key(), got {key!r:.60}")
    if not isinstance(meta, dict):
        raise ValueError(f"put_chunks item {index}: meta must be a dict, got {type(meta).__name__}")
    return key, kv, meta, emb


def encode_item(key: bytes, kv, emb) -> tuple[bytes, bytes | None, int, int, int]:
    """(kv bytes, embedding bytes or None, payload bytes, tokens, embedding dim) of one new chunk."""
    kv_bytes = encode_entry(key, kv)
    emb_bytes, dim = None, 0
    if emb is not None:
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 1 or emb.size == 0 or not np.isfinite(emb).all():
            raise ValueError(
                f"chunk {key.hex()[:16]}: embedding must be a finite float32 vector [dim], got shape {emb.shape}"
            )
        emb_bytes, dim = encode_emb(emb), emb.size
    return kv_bytes, emb_bytes, *encoded_sizes(kv_bytes), dim


def encode_entry(key: bytes, kv) -> bytes:
    """One chunk's KV entry: encoded from a tensor [2, layers, kv_heads, tokens, head_dim] (or a QuantizedKV),
    or taken as is when it is already an entry (bytes copied from another tier), once its checksum passes."""
    if isinstance(kv, (bytes, bytearray, memoryview)):
        try:
            decode_kv(kv, verify=True)
        except CorruptEntryError as e:
            raise ValueError(f"chunk {key.hex()[:16]}: the KV entry given is damaged: {e}") from e
        return bytes(kv)
    if not isinstance(kv, (torch.Tensor, QuantizedKV)) or kv.dim() != 5 or kv.shape[0] != 2:
        shape = list(kv.shape) if isinstance(kv, (torch.Tensor, QuantizedKV)) else type(kv).__name__
        raise ValueError(
            f"chunk {key.hex()[:16]}: kv must be a tensor [2, layers, kv_heads, tokens, head_dim], got {shape}"
        )
    return encode_kv(kv)


def encoded_sizes(kv_bytes: bytes) -> tuple[int, int]:
    """(payload bytes, tokens) of an entry just encoded."""
    sizes = entry_sizes(kv_bytes)
    if sizes is None:
        raise ValueError("KV to store must be [2, layers, kv_heads, tokens, head_dim]")
    return sizes


def meta_record(key: bytes, meta: dict, chunk_id: int) -> bytes:
    try:
        return encode_meta({**meta, "id": chunk_id})
    except (TypeError, ValueError) as e:
        raise ValueError(f"chunk {key.hex()[:16]}: meta is not JSON-serializable: {e}") from e


def add_sizes(totals: dict, kv_buf, sign: int) -> None:
    """Add (sign=1) or remove (sign=-1) one stored KV entry's payload bytes and tokens from the totals."""
    sizes = entry_sizes(kv_buf)
    # A damaged header cannot say its size: count its bytes beyond a 64-byte header, no tokens.
    num_payload, num_tokens = sizes if sizes is not None else (max(len(kv_buf) - 64, 0), 0)
    totals["kv_bytes"] = max(0, totals["kv_bytes"] + sign * num_payload)
    totals["num_tokens"] = max(0, totals["num_tokens"] + sign * num_tokens)


def check_emb_dim(emb_dim: int | None, dim: int, key: bytes) -> int:
    if emb_dim is not None and dim != emb_dim:
        raise ValueError(
            f"chunk {key.hex()[:16]}: embedding has dim {dim}, the store holds dim {emb_dim}; the embedder "
            "changed: ingest into a new store"
        )
    return dim


def check_record(found: dict, key: bytes, meta, kv, emb, dim: int | None) -> None:
    """File one chunk's damaged or legacy values under `found` (`scan`'s result); kv None: not checked."""
    if meta is None:
        return
    try:
        decode_meta(meta)
    except CorruptEntryError:
        found["meta"].append(key)
    legacy = not is_checked(meta, META_MAGIC)
    if kv is not None:
        try:
            decode_kv(kv, verify=True)
        except CorruptEntryError:
            found["kv"].append(key)
    if emb is not None:
        try:
            decode_emb(emb, dim)
        except CorruptEntryError:
            found["emb"].append(key)
        legacy = legacy or not is_checked(emb, EMB_MAGIC)
    if legacy and key not in found["meta"]:
        found["legacy"].append(key)
