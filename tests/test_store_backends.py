"""Every store backend keeps the same contract: LMDB, Redis (a real redis-server), and LMDB in front of Redis.

The Redis-specific behaviour (eviction by Redis, outages, damaged shared entries, races between writers)
is tested after the contract.
"""
import threading

import pytest
import torch

from store import (CorruptEntryError, StoreError, StoreUnavailableError, open_backend, parse_store_spec,
                   store_exists)
from store.redisstore import KV_EXPIRE_S, RedisStore, split_redis_url

from .test_store_kvstore import bits, make_item, make_key, make_kv

BACKENDS = ("lmdb", "redis", "tiered")


def spec_for(kind, tmp_path, redis_url):
    return {"lmdb": str(tmp_path / "store"), "redis": redis_url,
            "tiered": f"lmdb:{tmp_path / 'near'}+{redis_url}"}[kind]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path, redis_url):
    store = open_backend(parse_store_spec(spec_for(request.param, tmp_path, redis_url)))
    yield store
    store.close()


# ---- the contract


def test_put_then_read_is_bit_exact(backend):
    items = [make_item(i, num_tokens=3 + i) for i in range(4)]
    ids = backend.put_chunks(items)
    assert ids == {item[0]: i for i, item in enumerate(items)}
    with backend.reader() as r:
        r.prefetch([item[0] for item in items], meta=True)
        for key, kv, meta, _ in items:
            got = r.kv(key)
            assert got.dtype == torch.float16 and torch.equal(bits(got), bits(kv))
            assert r.meta(key) == {**meta, "id": ids[key]}
        assert r.kv(make_key(99)) is None and r.meta(make_key(99)) is None


def test_a_key_is_stored_once_and_keeps_its_id(backend):
    first = backend.put_chunks([make_item(0), make_item(1)])
    again = backend.put_chunks([make_item(1), make_item(2), make_item(2)])
    assert again == {make_key(1): first[make_key(1)], make_key(2): 2}
    assert backend.watermark() == (3, 0)
    assert backend.missing([make_key(0), make_key(5), make_key(5), make_key(2)]) == [make_key(5)]
    assert make_key(0) in backend and make_key(5) not in backend
    assert backend.num_embeddings() == 3


def test_embeddings_since_an_id_and_ids_to_keys(backend):
    backend.put_chunks([make_item(i) for i in range(5)])
    ids, vecs = backend.embeddings(since_id=3)
    assert ids.tolist() == [3, 4] and vecs[:, 0].tolist() == [3.0, 4.0]
    assert backend.key_for_id([4, 0, 77]) == [make_key(4), make_key(0), None]
    assert backend.embedding(make_key(2)).tolist() == [2.0] * 4


def test_delete_retires_and_replace_rewrites(backend):
    backend.put_chunks([make_item(i) for i in range(3)])
    assert backend.delete_chunks([make_key(1), make_key(9)]) == 1
    assert backend.watermark() == (3, 1)
    assert backend.embeddings()[0].tolist() == [0, 2]
    assert backend.key_for_id([1]) == [None] and make_key(1) not in backend
    fresh = make_kv(5, seed=42)
    backend.replace_kv([(make_key(2), fresh), (make_key(1), fresh)])  # a deleted key is skipped
    with backend.reader() as r:
        assert torch.equal(bits(r.kv(make_key(2))), bits(fresh)) and r.kv(make_key(1)) is None


def test_sources_manifest_and_quota(backend):
    assert backend.manifest is None
    backend.write_manifest({"model": "m", "n": 1})
    assert backend.manifest == {"model": "m", "n": 1}
    backend.put_source("a.txt", {"digest": "d", "complete": True})
    assert backend.get_source("a.txt") == {"digest": "d", "complete": True}
    assert backend.sources() == {"a.txt": {"digest": "d", "complete": True}}
    backend.delete_source("a.txt")
    assert backend.get_source("a.txt") is None
    assert backend.charge_documents("ns", [60, 50, 30], quota=100) == [True, False, True]
    assert backend.document_bytes("ns") == 90 and backend.document_bytes("other") == 0


def test_malformed_items_write_nothing(backend):
    with pytest.raises(ValueError, match="kv must be a tensor"):
        backend.put_chunks([make_item(0), (make_key(1), torch.zeros(3), {}, None)])
    assert backend.watermark() == (0, 0) and make_key(0) not in backend


def test_an_encoded_entry_copies_between_stores(backend, tmp_path):
    """The tiered store copies raw entries; any backend accepts them (checksum checked)."""
    from store import encode_kv

    kv = make_kv(4, seed=3)
    backend.put_kv(make_key(0), encode_kv(kv), {"text": "x"})
    with backend.reader() as r:
        assert torch.equal(bits(r.kv(make_key(0))), bits(kv))
    damaged = bytearray(encode_kv(kv))
    damaged[-1] ^= 0xFF
    with pytest.raises(ValueError, match="damaged"):
        backend.put_kv(make_key(1), bytes(damaged), {})


def test_scan_finds_a_damaged_entry(backend):
    backend.put_chunks([make_item(i) for i in range(3)])
    corrupt_kv(backend, make_key(1))
    assert backend.scan()["kv"] == [make_key(1)]
    with backend.reader() as r, pytest.raises(CorruptEntryError, match="unreadable"):
        r.kv(make_key(1))


def corrupt_kv(backend, key):
    """Flip the last payload byte of a stored entry in the backend's source of truth (and near copy)."""
    far = getattr(backend, "far", backend)
    if isinstance(far, RedisStore):
        buf = bytearray(far.client.get(far.kv_name(key)))
        buf[-1] ^= 0xFF
        far.client.set(far.kv_name(key), bytes(buf))
        if far is not backend:
            backend.near.delete_chunks([key])
        return
    with backend._env.begin(write=True) as txn:
        buf = bytearray(txn.get(key, db=backend._dbs["kv"]))
        buf[-1] ^= 0xFF
        txn.put(key, bytes(buf), db=backend._dbs["kv"])


# ---- specs


@pytest.mark.parametrize("text, local, remote", [
    ("/data/store", "/data/store", None),
    ("lmdb:/data/store", "/data/store", None),
    ("redis://h:6379/0?prefix=a", None, "redis://h:6379/0?prefix=a"),
    ("lmdb:/near+x+redis://:pw@h:1/2", "/near+x", "redis://:pw@h:1/2"),
    ("lmdb:rel+unix:///tmp/r.sock", "rel", "unix:///tmp/r.sock"),
])
def test_store_specs(text, local, remote):
    spec = parse_store_spec(text)
    assert (str(spec.local) if spec.local else None, spec.remote) == (local, remote)
    assert "pw" not in spec.describe()


@pytest.mark.parametrize("text", ["", "lmdb:", "lmdb:+redis://h:1/0"])
def test_bad_specs_say_what_to_give(text):
    with pytest.raises(ValueError, match="give|empty"):
        parse_store_spec(text)


def test_prefix_is_ours_and_the_rest_is_redis(redis_server):
    assert split_redis_url("redis://h:1/0?prefix=p&socket_timeout=3") == ("redis://h:1/0?socket_timeout=3", "p")
    with pytest.raises(ValueError, match="prefix"):
        split_redis_url("redis://h:1/0?prefix=a*")


def test_prefixes_are_separate_stores(redis_server):
    a = RedisStore(redis_server.url + "?prefix=sep-a")
    b = RedisStore(redis_server.url + "?prefix=sep-b")
    a.put_chunks([make_item(0)])
    assert make_key(0) in a and make_key(0) not in b and b.watermark() == (0, 0)
    assert store_exists(parse_store_spec(redis_server.url + "?prefix=sep-b")) is False
    a.write_manifest({"m": 1})
    assert store_exists(parse_store_spec(redis_server.url + "?prefix=sep-a")) is True


def test_readonly_open_of_an_empty_prefix_says_how_to_build_one(redis_server):
    with pytest.raises(StoreError, match="chunkcache ingest"):
        RedisStore(redis_server.url + "?prefix=nothing-here", readonly=True)


def test_unreachable_redis_is_a_clear_error_at_open():
    with pytest.raises(StoreUnavailableError, match="unreachable.*Redis is running"):
        RedisStore("redis://127.0.0.1:1/0")


# ---- Redis specifics


def test_only_kv_entries_are_evictable(redis_url):
    """Under volatile-lru Redis evicts only keys with an expiry: the KV entries, never metadata or ids."""
    store = RedisStore(redis_url)
    store.put_chunks([make_item(0)])
    assert store.client.ttl(store.kv_name(make_key(0))) > KV_EXPIRE_S - 60
    assert store.client.ttl(store.meta_name(make_key(0))) == -1  # no expiry
    store.close()


def test_racing_writers_give_a_chunk_one_id(redis_url):
    stores = [RedisStore(redis_url) for _ in range(4)]
    results = []

    def write(store, order):
        results.append(store.put_chunks([make_item(i) for i in order]))

    threads = [threading.Thread(target=write, args=(s, list(range(12))[::(1 if n % 2 else -1)]))
               for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert sorted(results[0].values()) == list(range(12))
    assert stores[0].watermark() == (12, 0) and stores[0].num_embeddings() == 12
    assert stores[0].client.hlen(stores[0]._ids) == 12
    for s in stores:
        s.close()


def test_an_evicted_kv_comes_back_under_its_old_id(redis_url):
    store = RedisStore(redis_url)
    store.put_chunks([make_item(i) for i in range(3)])
    store.client.delete(store.kv_name(make_key(1)))  # what Redis's LRU does
    assert store.missing([make_key(0), make_key(1)]) == [make_key(1)]
    assert store.put_chunks([make_item(1)]) == {make_key(1): 1}
    assert store.watermark() == (3, 0) and store.num_embeddings() == 3
    store.close()


def test_redacted_urls_hide_every_password():
    from store.redisstore import redacted

    assert redacted("redis://user:s3cret@h:1/0?prefix=p") == "redis://user:***@h:1/0?prefix=p"
    assert "s3cret" not in redacted("redis://h:1/0?password=s3cret&prefix=p")
    assert "s3cret" not in repr(parse_store_spec("lmdb:/d+redis://:s3cret@h:1/0"))
    with pytest.raises(ValueError) as info:
        split_redis_url("redis://:s3cret@h:1/0?prefix=a*")
    assert "s3cret" not in str(info.value)


def test_other_redis_refusals_are_store_errors(redis_url):
    """Out of memory is a full store (507 on the server); any other refusal a StoreError, not a raw redis one."""
    from store import DiskFullError

    store = RedisStore(redis_url)
    store.client.config_set("maxmemory", 1)
    store.client.config_set("maxmemory-policy", "noeviction")
    try:
        with pytest.raises(DiskFullError, match="maxmemory"):
            store.put_chunks([make_item(0)])
    finally:
        store.client.config_set("maxmemory", 0)
        store.client.config_set("maxmemory-policy", "volatile-lru")
    store.close()


def test_scan_and_delete_clear_orphan_ids(redis_url):
    store = RedisStore(redis_url)
    store.put_chunks([make_item(i) for i in range(3)])
    store.client.delete(store.meta_name(make_key(1)))  # an id row left without its chunk
    assert store.scan()["orphan_ids"] == [make_key(1)]
    store.delete_chunks([make_key(1)])
    assert store.scan()["orphan_ids"] == [] and store.key_for_id([1]) == [None]
    assert store.num_embeddings() == 2
    store.close()


def test_reads_degrade_and_writes_refuse_while_redis_is_down(tmp_path):
    from .conftest import RedisServer

    server = RedisServer(tmp_path / "r", persist=True)
    store = RedisStore(server.url)
    store.put_chunks([make_item(i) for i in range(3)])
    assert store.key_for_id([0, 1]) == [make_key(0), make_key(1)]
    with store.reader() as r:
        r.meta(make_key(0))
    server.stop()
    assert store.missing([make_key(0)]) == [make_key(0)]  # a miss: the caller computes
    store._failed_at = 0.0  # past the fail-fast window: the calls below try Redis again
    with store.reader() as r:
        assert r.kv(make_key(0)) is None
        assert r.meta(make_key(0))["source"] == "doc0.txt"  # seen before
        with pytest.raises(StoreUnavailableError):
            r.meta(make_key(2))  # never seen here
    assert store.key_for_id([1]) == [make_key(1)]
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        store.put_chunks([make_item(5)])
    assert store.outages >= 3 and not store.available
    server.start()
    store._failed_at = 0.0
    assert store.missing([make_key(0), make_key(7)]) == [make_key(7)]  # back, with its data
    assert store.available
    store.close()
    server.stop()


def test_a_near_copy_does_not_make_a_chunk_stored(tmp_path, redis_url):
    """Whether a chunk is stored is Redis's to say: a near copy of a chunk retired elsewhere is not."""
    tiered = open_backend(parse_store_spec(f"lmdb:{tmp_path / 'near'}+{redis_url}"))
    tiered.put_chunks([make_item(0), make_item(1)])
    other = RedisStore(redis_url)
    other.delete_chunks([make_key(0)])  # another replica retires it
    assert tiered.missing([make_key(0), make_key(1)]) == [make_key(0)] and make_key(0) not in tiered
    other.close()
    tiered.close()


def test_a_damaged_near_copy_is_replaced_by_the_shared_one(tmp_path, redis_url):
    tiered = open_backend(parse_store_spec(f"lmdb:{tmp_path / 'near'}+{redis_url}"))
    tiered.put_chunks([make_item(0)])
    corrupt_kv(tiered.near, make_key(0))
    with tiered.reader() as r:
        assert torch.equal(bits(r.kv(make_key(0))), bits(make_item(0)[1]))  # read from Redis
    assert tiered.near.scan()["kv"] == []  # and the near copy rewritten
    tiered.close()


def test_a_wrong_password_says_so(tmp_path):
    from .conftest import RedisServer

    server = RedisServer(tmp_path / "r")
    try:
        server.client().config_set("requirepass", "right")
        wrong = server.url.replace("redis://", "redis://:wrong@")
        with pytest.raises(StoreError, match="check the password") as info:
            RedisStore(wrong)
        assert "wrong" not in str(info.value)
        RedisStore(server.url.replace("redis://", "redis://:right@")).close()
    finally:
        server.stop()
