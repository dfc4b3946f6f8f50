"""KVStore on LMDB: bit-exact round trips, dedup, map growth, atomicity, errors, reader lifetime."""

import threading
import time

import lmdb
import numpy as np
import pytest
import torch

from store import CorruptEntryError, KVStore, StoreError, chunk_key

LAYERS, HEADS, DIM = 3, 2, 8


def make_kv(num_tokens, seed, dtype=torch.float16):
    """[2, layers, kv_heads, tokens, head_dim] with random bit patterns (NaNs and infs included)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, (2, LAYERS, HEADS, num_tokens, DIM), dtype=torch.int64, generator=gen)
    return bits.to(torch.int16).view(dtype)


def make_key(i, namespace=""):
    return chunk_key("test-model", [1, 2, 3], [100 + i], kv_dtype="float16", namespace=namespace)


def make_item(i, num_tokens=5, emb_dim=4):
    emb = np.full(emb_dim, i, dtype=np.float32)
    return make_key(i), make_kv(num_tokens, seed=i), {"source": f"doc{i}.txt", "num_tokens": num_tokens}, emb


def bits(t):
    return t.view(torch.int16)


@pytest.fixture
def store(tmp_path):
    with KVStore(tmp_path / "store") as s:
        yield s


def test_put_then_read_is_bit_exact(store):
    items = [make_item(i, num_tokens=3 + i) for i in range(4)]
    ids = store.put_chunks(items)
    assert ids == {item[0]: i for i, item in enumerate(items)}
    with store.reader() as r:
        for key, kv, meta, _ in items:
            got = r.kv(key)
            assert got.dtype == torch.float16 and torch.equal(bits(got), bits(kv))
            assert r.meta(key) == {**meta, "id": ids[key]}
        assert r.kv(make_key(99)) is None and r.meta(make_key(99)) is None


def test_bfloat16_round_trip(store):
    kv = make_kv(7, seed=1, dtype=torch.bfloat16)
    store.put_kv(make_key(0), kv, {"text": "x"})
    with store.reader() as r:
        assert torch.equal(bits(r.kv(make_key(0))), bits(kv))


def test_put_does_not_mutate_meta(store):
    meta = {"text": "hello"}
    store.put_kv(make_key(0), make_kv(2, 0), meta)
    assert meta == {"text": "hello"}
    assert store.get_meta(make_key(0)) == {"text": "hello", "id": 0}


def test_dedup_keeps_first_entry_and_id(store):
    key, kv, _, _ = make_item(0)
    assert store.put_kv(key, kv, {"v": 1}) == 0
    assert store.put_chunks([make_item(1), (key, make_kv(5, 7), {"v": 2}, None), make_item(1)]) == {
        make_key(1): 1,
        key: 0,
    }
    assert len(store) == 2
    assert store.get_meta(key) == {"v": 1, "id": 0}
    with store.reader() as r:
        assert torch.equal(bits(r.kv(key)), bits(kv))


def test_namespace_keeps_tenants_apart(store):
    kv = make_kv(2, 0)
    store.put_kv(make_key(0, "a"), kv, {})
    store.put_kv(make_key(0, "b"), kv, {})
    assert len(store) == 2


def test_contains_missing_and_len(store):
    store.put_chunks([make_item(0), make_item(2)])
    assert make_key(0) in store and make_key(1) not in store
    assert store.missing([make_key(3), make_key(0), make_key(1), make_key(3), make_key(2)]) == [make_key(3), make_key(1)]
    assert len(store) == 2


def test_ids_and_embeddings(store):
    store.put_chunks([make_item(0), (make_key(1), make_kv(2, 1), {}, None), make_item(2)])
    assert store.key_for_id([2, 0, 1, 7, -1]) == [make_key(2), make_key(0), make_key(1), None, None]
    assert store.key_for_id(np.array([1])) == [make_key(1)]
    ids, embs = store.embeddings()
    assert ids.dtype == np.int64 and ids.tolist() == [0, 2]
    assert embs.dtype == np.float32 and np.array_equal(embs, [[0] * 4, [2] * 4])


def test_embeddings_of_empty_store(store):
    ids, embs = store.embeddings()
    assert ids.shape == (0,) and embs.shape == (0, 0)


def test_embedding_dim_mismatch_is_rejected(store):
    store.put_chunks([make_item(0, emb_dim=4)])
    with pytest.raises(ValueError, match="embedding has dim 5, the store holds dim 4"):
        store.put_chunks([make_item(1, emb_dim=5)])
    assert len(store) == 1


def test_map_grows_instead_of_failing(tmp_path):
    tokens = 4096  # 2*3*2*4096*8*2 bytes = 768 KiB per chunk, 12x the initial map
    kvs = {make_key(i): make_kv(tokens, i) for i in range(8)}
    with KVStore(tmp_path / "s", map_size=64 << 10) as store:
        keys = list(kvs)
        store.put_chunks([(k, kvs[k], {"i": i}, None) for i, k in enumerate(keys[:5])])
        for i, k in enumerate(keys[5:], start=5):
            store.put_kv(k, kvs[k], {"i": i})
        assert store.stats()["map_size"] > 64 << 10
    with KVStore(tmp_path / "s", readonly=True) as store:
        assert len(store) == 8
        with store.reader() as r:
            for k, kv in kvs.items():
                assert torch.equal(bits(r.kv(k)), bits(kv))


@pytest.mark.parametrize(
    "bad_item",
    [
        (make_key(9), "not a tensor", {}, None),
        (make_key(9), torch.ones(3, 4), {}, None),
        (make_key(9), make_kv(2, 9), {"x": object()}, None),
        (b"short", make_kv(2, 9), {}, None),
        (make_key(9), make_kv(2, 9), {}, np.array([np.nan], dtype=np.float32)),
    ],
    ids=["non-tensor", "wrong-shape", "meta-not-json", "bad-key", "nan-embedding"],
)
def test_failed_batch_leaves_store_unchanged(store, bad_item):
    store.put_chunks([make_item(0)])
    before = store.stats()
    with pytest.raises(ValueError):
        store.put_chunks([make_item(1), make_item(2), bad_item, make_item(3)])
    assert store.stats() == before and len(store) == 1
    assert store.missing([make_key(i) for i in range(4)]) == [make_key(1), make_key(2), make_key(3)]
    assert store.put_kv(make_key(1), make_kv(2, 1), {}) == 1  # ids continue without a gap


def test_readonly_missing_store_says_how_to_create_it(tmp_path):
    with pytest.raises(StoreError, match=r"no store at .*run `chunkcache ingest PATH --store"):
        KVStore(tmp_path / "nothing", readonly=True)
    assert not (tmp_path / "nothing").exists()


def test_readonly_store_reads_but_refuses_writes(tmp_path):
    with KVStore(tmp_path / "s") as store:
        store.put_chunks([make_item(0)])
    with KVStore(tmp_path / "s", readonly=True) as store:
        assert store.get_meta(make_key(0))["id"] == 0
        with pytest.raises(StoreError, match="opened readonly"):
            store.put_chunks([make_item(1)])


def test_reopen_keeps_data_and_continues_ids(tmp_path):
    with KVStore(tmp_path / "s") as store:
        store.put_chunks([make_item(0), make_item(1)])
    with KVStore(tmp_path / "s") as store:
        assert len(store) == 2
        assert store.put_chunks([make_item(2)]) == {make_key(2): 2}


def test_reader_views_are_valid_only_inside_the_block(store):
    kv = make_kv(6, 0)
    store.put_kv(make_key(0), kv, {})
    dst = torch.empty_like(kv)
    with store.reader() as r:
        view = r.kv(make_key(0))
        dst.copy_(view)
    with pytest.raises(StoreError, match="after its `with store.reader\\(\\)` block"):
        r.kv(make_key(0))
    store.put_chunks([make_item(i, num_tokens=50) for i in range(1, 10)])  # reuses freed pages
    assert torch.equal(bits(dst), bits(kv))


def test_map_cannot_grow_under_this_threads_reader(tmp_path):
    with KVStore(tmp_path / "s", map_size=64 << 10) as store:
        big = (make_key(1), make_kv(4096, 1), {}, None)
        with store.reader():
            with pytest.raises(StoreError, match="inside `store.reader\\(\\)`"):
                store.put_chunks([big])
        assert len(store) == 0
        store.put_chunks([big])
        assert len(store) == 1


def test_map_growth_waits_for_other_threads_readers(tmp_path):
    with KVStore(tmp_path / "s", map_size=64 << 10) as store:
        store.put_kv(make_key(0), make_kv(4, 0), {})
        reading, release = threading.Event(), threading.Event()
        seen = []

        def hold_reader():
            with store.reader() as r:
                view = r.kv(make_key(0))
                reading.set()
                release.wait(10)
                seen.append(view.clone())

        reader_thread = threading.Thread(target=hold_reader)
        reader_thread.start()
        reading.wait(10)
        writer = threading.Thread(target=store.put_kv, args=(make_key(1), make_kv(4096, 1), {}))
        writer.start()
        time.sleep(0.2)
        assert writer.is_alive(), "map growth must wait for the open reader"
        release.set()
        reader_thread.join(10)
        writer.join(10)
        assert not writer.is_alive() and len(store) == 2
        assert torch.equal(bits(seen[0]), bits(make_kv(4, 0)))


def test_corrupt_entry_names_key_and_fix(tmp_path):
    kv = make_kv(5, 0)
    with KVStore(tmp_path / "s") as store:
        store.put_kv(make_key(0), kv, {})
    env = lmdb.open(str(tmp_path / "s" / "kv.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        db = env.open_db(b"kv", txn=txn)
        value = bytearray(txn.get(make_key(0), db=db))
        value[-1] ^= 0xFF
        txn.put(make_key(0), bytes(value), db=db)
    env.close()
    with KVStore(tmp_path / "s") as store, store.reader() as r:
        with pytest.raises(CorruptEntryError, match=f"chunk {make_key(0).hex()[:16]}.*checksum.*chunkcache verify --repair"):
            r.kv(make_key(0))
        assert torch.equal(bits(r.kv(make_key(0), verify=False)[..., :-1]), bits(kv[..., :-1]))


def test_sources_and_manifest_round_trip(store):
    assert store.manifest is None and store.sources() == {} and store.get_source("a.txt") is None
    manifest = {"model": "SmolLM2-135M", "kv_dtype": "float16", "prefix_ids": [1, 2, 3], "note": "ünïcode"}
    store.write_manifest(manifest)
    store.put_source("docs/a.txt", {"sha256": "ab", "keys": ["00ff"]})
    store.put_source("docs/b.txt", {"sha256": "cd", "keys": []})
    store.put_source("docs/a.txt", {"sha256": "ef", "keys": []})
    assert store.manifest == manifest
    assert store.get_source("docs/a.txt") == {"sha256": "ef", "keys": []}
    assert store.sources() == {"docs/a.txt": {"sha256": "ef", "keys": []}, "docs/b.txt": {"sha256": "cd", "keys": []}}


def test_stats(store):
    assert store.stats()["num_chunks"] == 0 and store.stats()["bytes_per_token"] == 0.0
    store.put_chunks([make_item(0, num_tokens=5), make_item(1, num_tokens=7), make_item(0, num_tokens=5)])
    stats = store.stats()
    bytes_per_token = 2 * LAYERS * HEADS * DIM * 2
    assert stats["num_chunks"] == 2
    assert stats["num_tokens"] == 12
    assert stats["kv_bytes"] == 12 * bytes_per_token
    assert stats["bytes_per_token"] == bytes_per_token
    assert stats["map_size"] == 1 << 30
    assert stats["file_bytes"] > stats["kv_bytes"]
