"""Request KV caches: one tensor of their own, or a slot of the engine's pool.

A request's `KVCache` holds row j = the token at position j, in every layer. Outside the engine it is a
tensor of its own (`new_cache`). The engine takes its requests' caches as slots of one `KVPool`
instead, because of what a decode step costs: over B requests with caches of their own, each layer
pays B attention calls and 2B row writes, whose fixed costs were a third of an 8-request step on 2
CPU threads (bench/results/load/). With the caches side by side in one buffer, `forward.RowPass`
writes all the step's decode rows with one index_put and attends with one masked call
(`pooled_decode_attention`), each slot's rows padded to the longest. A slot is a view, so every
other path (placing chunks from the store, prefill, selection) reads and writes it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import LoadedModel


@dataclass
class KVCache:
    """The per-request KV cache; row j holds the token at position j.

    k, v: [layers, kv_heads, capacity, head_dim] in the model's compute dtype.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    # Optional attention correction (chunkcache/blend.py, `chunk_key_bias`): fp32 [layers, 1 or
    # q_heads, capacity] added to the attention logits of every query at a position >= bias_from,
    # so log(S) on a reused chunk's stale rows scales their attention mass by S. A row computed
    # in a layer is fresh there, and its bias is cleared. None: plain attention. Set it with
    # `set_key_bias` (a pooled cache keeps it in its pool, per query head).
    key_bias: torch.Tensor | None = None
    bias_from: int = 0
    pool: KVPool | None = None  # the pool this cache is a slot of (k, v and key_bias are views of it)
    slot: int = -1
    # Rows [0, prompt_rows) are the prompt's: its owner writes them (placing, prefill) before it decodes,
    # and until then they may hold anything. A pooled decode step reads a slot's rows past its own
    # position (masked), which is safe only beyond them: `take` zeroed those.
    prompt_rows: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def set_key_bias(self, bias: torch.Tensor, bias_from: int) -> None:
        """bias: fp32 [layers, 1 or q_heads, capacity] (`blend.chunk_key_bias`)."""
        self.key_bias = bias if self.pool is None else self.pool.store_bias(self.slot, bias)
        self.bias_from = bias_from


def new_cache(lm: LoadedModel, capacity: int) -> KVCache:
    shape = (lm.num_layers, lm.num_kv_heads, capacity, lm.head_dim)
    # empty, not zeros: every row is written (copied from the store or computed) before it is read.
    return KVCache(torch.empty(shape, dtype=lm.dtype, device=lm.device),
                   torch.empty(shape, dtype=lm.dtype, device=lm.device))


def pool_bytes_per_slot_token(lm: LoadedModel) -> int:
    """What one token of one slot takes: K and V in the compute dtype, and its fp32 chunk-scale bias per query head."""
    return lm.kv_bytes_per_token(lm.dtype) + 4 * lm.num_layers * lm.num_q_heads


class KVPool:
    """`slots` request caches of up to `capacity` rows each, side by side:
    k, v [layers, slots, kv_heads, capacity, head_dim]; bias fp32 [layers, slots, q_heads, capacity], made when
    a request first needs one. Slots are taken lowest first, so running requests sit in a short range."""

    def __init__(self, lm: LoadedModel, slots: int, capacity: int):
        shape = (lm.num_layers, slots, lm.num_kv_heads, capacity, lm.head_dim)
        self.k = torch.empty(shape, dtype=lm.dtype, device=lm.device)
        self.v = torch.empty(shape, dtype=lm.dtype, device=lm.device)
        self.bias: torch.Tensor | None = None
        self._q_heads = lm.num_q_heads
        self._bytes = slots * capacity * pool_bytes_per_slot_token(lm)
        self._caches: list[KVCache | None] = [None] * slots

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """What the pool may take, the bias counted whether it has been made yet or not."""
        return self._bytes

    @property
    def in_use(self) -> int:
        return sum(cache is not None for cache in self._caches)

    def has_room(self, capacity: int) -> bool:
        return capacity <= self.capacity and None in self._caches

    def take(self, capacity: int, written_below: int) -> KVCache:
        """A free slot as a cache of `capacity` rows, whose rows below `written_below` its owner writes before
        they are read (the prompt's). The rest are zeroed: a batched decode reads them, masked, when another
        slot is longer, and a masked stale NaN or inf would still poison the sum (0 * nan = nan)."""
        if not self.has_room(capacity):
            raise ValueError(f"no free slot of {capacity} rows in a pool of {self.slots} x {self.capacity}")
        slot = self._caches.index(None)
        self.k[:, slot, :, written_below:].zero_()
        self.v[:, slot, :, written_below:].zero_()
        if self.bias is not None:
            self.bias[:, slot].zero_()
        cache = self._caches[slot] = KVCache(self.k[:, slot, :, :capacity], self.v[:, slot, :, :capacity],
                                             pool=self, slot=slot, prompt_rows=written_below)
        return cache

    def release(self, cache: KVCache) -> None:
        """The slot goes back; the cache no longer views it (a late write through it fails rather than landing
        in the next owner's rows)."""
        if cache.pool is not self or self._caches[cache.slot] is not cache:
            raise ValueError(f"this cache is not slot {cache.slot} of this pool (released already?)")
        self._caches[cache.slot] = None
        cache.pool, cache.key_bias = None, None
        cache.k = cache.v = self.k.new_empty((self.k.shape[0], self.k.shape[2], 0, self.k.shape[4]))  # 0 rows

    def store_bias(self, slot: int, bias: torch.Tensor) -> torch.Tensor:
        """Copy a request's chunk-scale bias into its slot -> the slot's view [layers, q_heads, capacity]."""
        if self.bias is None:
            self.bias = self._zero_bias()
        view = self.bias[:, slot, :, :bias.shape[-1]]
        view.copy_(bias)  # a bias shared by the heads ([layers, 1, capacity]) broadcasts
        return view

    def _zero_bias(self) -> torch.Tensor:
        return torch.zeros((self.k.shape[0], self.slots, self._q_heads, self.capacity), dtype=torch.float32,
                           device=self.k.device)

    def resized(self, lm: LoadedModel, capacity: int) -> KVPool:
        """A pool of the same slots and `capacity` rows each (>= this one's), holding the live caches: their
        rows are copied and each cache object now views the new pool."""
        if capacity < self.capacity:
            raise ValueError(f"a pool only grows ({self.capacity} -> {capacity} rows)")
        grown = KVPool(lm, self.slots, capacity)
        old = self.capacity
        grown.k[:, :, :, old:].zero_()  # as in `take`: rows a slot has not written must be finite
        grown.v[:, :, :, old:].zero_()
        grown.k[:, :, :, :old].copy_(self.k)
        grown.v[:, :, :, :old].copy_(self.v)
        if self.bias is not None:
            grown.bias = grown._zero_bias()
            grown.bias[..., :old].copy_(self.bias)
        if any(c is not None and c.key_bias is not None and not views_of(c.key_bias, self.bias) for c in self._caches):
            raise ValueError("a pooled cache's key_bias must be set with set_key_bias (it lives in the pool)")
        for slot, cache in enumerate(self._caches):
            if cache is None:
                continue
            rows = cache.capacity
            cache.k, cache.v = grown.k[:, slot, :, :rows], grown.v[:, slot, :, :rows]
            if cache.key_bias is not None:
                cache.key_bias = grown.bias[:, slot, :, :rows]
            cache.pool = grown
            grown._caches[slot] = cache
        self._caches = [None] * self.slots
        return grown


def views_of(view: torch.Tensor, base: torch.Tensor | None) -> bool:
    """Whether `view` shares `base`'s storage (a slot's view of its pool)."""
    return base is not None and view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def decode_mask(lengths: torch.Tensor, kv_len: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of one decode query per slot: lengths int64 [R] (the query sits at row length - 1)
    -> [R, 1, 1, kv_len], 0 on the rows it sees (within `window` of its own, if any) and -inf elsewhere."""
    cols = torch.arange(kv_len, device=lengths.device)
    visible = cols < lengths[:, None]
    if window is not None:
        visible &= cols >= (lengths - window)[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=lengths.device).masked_fill_(~visible, float("-inf"))
    return mask[:, None, None]


def pooled_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None, local: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query for each of B slots of a range of R, over their rows of one layer, in one call.

    q: [B, q_heads, D]; k, v: [R, kv_heads, kv_len, D] (the range's slots of the pool, up to the longest
    member's row); mask: `decode_mask` [R, 1, 1, kv_len] (a slot without a query sees row 0 only); bias:
    the range's chunk-scale bias fp32 [R, q_heads, kv_len] or None; local: int64 [B], each query's slot
    within the range (None: the B queries are the R slots, in order).
    -> [B, q_heads, D]: what `forward._attention` gives each query alone, up to rounding.
    """
    if bias is not None:
        mask = (mask + bias[:, :, None]).to(q.dtype)
    queries = q if local is None else q.new_zeros((k.shape[0],) + q.shape[1:]).index_copy_(0, local, q)
    out = F.scaled_dot_product_attention(queries[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, 0] if local is None else out[local, :, 0]
