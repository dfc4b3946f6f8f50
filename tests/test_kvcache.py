"""Request KV caches as slots of a KVPool: views that every path reads and writes as a cache of its own."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from chunkcache.engine import Ticket
from chunkcache.kvcache import KVPool, new_cache


def test_a_slot_is_a_view_of_the_pool_and_its_unwritten_rows_are_zero(tiny_lm):
    pool = KVPool(tiny_lm, slots=3, capacity=32)
    pool.k.fill_(float("nan"))  # what a reused buffer may hold
    pool.v.fill_(float("nan"))
    first, second = pool.take(20, written_below=12), pool.take(32, written_below=0)
    assert (first.slot, second.slot, first.capacity, second.capacity) == (0, 1, 20, 32)
    assert not pool.k[:, 0, :, 12:].isnan().any() and not pool.v[:, 0, :, 12:].any()
    assert pool.k[:, 0, :, :12].isnan().all()  # the prompt rows are the owner's to write
    first.k[2, :, 3] = 7.0
    assert (pool.k[2, 0, :, 3] == 7.0).all()
    assert pool.in_use == 2 and pool.has_room(32) and not pool.has_room(33)
    pool.take(8, 8)
    assert not pool.has_room(1)
    pool.release(first)
    assert pool.in_use == 2 and first.pool is None and first.k.numel() == 0  # it no longer views the slot
    with pytest.raises(ValueError, match="released already"):
        pool.release(first)
    assert pool.take(8, 8).slot == 0  # lowest slot first
    with pytest.raises(ValueError, match="no free slot"):
        pool.take(8, 8)


def test_a_pooled_key_bias_lives_in_the_pool_and_a_new_owner_starts_without_one(tiny_lm):
    pool = KVPool(tiny_lm, slots=2, capacity=16)
    cache = pool.take(16, 16)
    bias = torch.zeros(tiny_lm.num_layers, 1, 16)
    bias[:, :, 4:9] = -0.5
    cache.set_key_bias(bias, bias_from=10)
    assert cache.bias_from == 10 and cache.key_bias.shape == (tiny_lm.num_layers, tiny_lm.num_q_heads, 16)
    assert (pool.bias[:, 0, :, 4:9] == -0.5).all() and not pool.bias[:, 1].any()
    pool.release(cache)
    again = pool.take(16, 16)
    assert again.key_bias is None and not pool.bias[:, 0].any()
    private = new_cache(tiny_lm, 16)
    private.set_key_bias(bias, 3)
    assert private.key_bias is bias


def test_a_resized_pool_keeps_the_live_caches_rows_and_they_view_it(tiny_lm):
    pool = KVPool(tiny_lm, slots=2, capacity=16)
    cache = pool.take(16, 16)
    cache.k.normal_()
    cache.v.normal_()
    cache.set_key_bias(torch.full((tiny_lm.num_layers, 1, 16), -0.25), 0)
    k, v = cache.k.clone(), cache.v.clone()
    grown = pool.resized(tiny_lm, 40)
    assert cache.pool is grown and grown.capacity == 40 and grown.in_use == 1 and pool.in_use == 0
    torch.testing.assert_close(cache.k, k, rtol=0, atol=0)
    torch.testing.assert_close(cache.v, v, rtol=0, atol=0)
    assert cache.k.data_ptr() == grown.k[:, cache.slot].data_ptr()
    assert (cache.key_bias == -0.25).all() and not grown.k[:, :, :, 16:].any()
    with pytest.raises(ValueError, match="only grows"):
        grown.resized(tiny_lm, 20)


def test_a_ticket_streams_its_queued_events_first_then_the_rest_in_order():
    ticket = Ticket(SimpleNamespace(cancelled=None))
    ticket.put("a")
    ticket.put("b")
    seen = []
    ticket.stream_to(seen.append)
    ticket.put("c")
    assert seen == ["a", "b", "c"]


def test_the_decode_mask_sees_each_row_up_to_its_own_within_the_window():
    from chunkcache.kvcache import decode_mask

    mask = decode_mask(torch.tensor([3, 1, 5]), 5, None, torch.float32)[:, 0, 0]
    assert (mask == 0).tolist() == [[True, True, True, False, False], [True, False, False, False, False],
                                    [True, True, True, True, True]]
    windowed = decode_mask(torch.tensor([5, 2]), 5, 2, torch.float32)[:, 0, 0]
    assert (windowed == 0).tolist() == [[False, False, False, True, True], [True, True, False, False, False]]
    assert windowed[0, 0] == float("-inf")
