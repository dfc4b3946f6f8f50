"""Store faults: truncated/foreign data.mdb refused before mapping, checksummed metadata and embeddings,
entries written before checksums, disk full, eviction order, chunk removal and the watermark."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import torch

from store import CorruptEntryError, DamagedStoreError, DiskFullError, KVStore
from store.eviction import EntryStats, choose_victims, eviction_order, recompute_cost
from store.lmdbfile import check_data_file
from store.records import decode_emb, decode_meta, encode_emb, encode_meta

from .test_store_kvstore import make_item, make_key, make_kv


def fill(path, n=6, num_tokens=40):
    with KVStore(path) as store:
        store.put_chunks([make_item(i, num_tokens=num_tokens) for i in range(n)])
    return path / "kv.lmdb" / "data.mdb"


def raw_put(path, db_name, key, value):
    env = lmdb.open(str(path / "kv.lmdb"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(key, value, db=env.open_db(db_name.encode(), txn=txn))
    env.close()


def raw_get(path, db_name, key):
    env = lmdb.open(str(path / "kv.lmdb"), max_dbs=16, readonly=True)
    with env.begin() as txn:
        value = txn.get(key, db=env.open_db(db_name.encode(), txn=txn, create=False))
    env.close()
    return value


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_data_file_is_refused_before_mapping(tmp_path, fraction):
    data = fill(tmp_path / "s")
    size = data.stat().st_size
    os.truncate(data, int(size * fraction) // 4096 * 4096)
    with pytest.raises(DamagedStoreError, match=r"truncated: \d+ bytes on disk, its LMDB meta page needs \d+"):
        KVStore(tmp_path / "s", readonly=True)
    with pytest.raises(DamagedStoreError, match="truncated"):
        KVStore(tmp_path / "s")


def test_foreign_data_file_is_refused(tmp_path):
    (tmp_path / "s" / "kv.lmdb").mkdir(parents=True)
    (tmp_path / "s" / "kv.lmdb" / "data.mdb").write_bytes(b"not lmdb at all" * 1000)
    with pytest.raises(DamagedStoreError, match="not an LMDB data file"):
        KVStore(tmp_path / "s", readonly=True)


def test_intact_and_missing_data_files_pass(tmp_path):
    check_data_file(fill(tmp_path / "s"))
    check_data_file(tmp_path / "none" / "data.mdb")


def test_damaged_first_meta_page_falls_back_to_the_second(tmp_path):
    data = fill(tmp_path / "s")
    raw = bytearray(data.read_bytes())
    raw[16:20] = b"\0\0\0\0"  # meta 0's magic
    data.write_bytes(bytes(raw))
    check_data_file(data)  # meta 1 still describes the file
    os.truncate(data, 8192)
    with pytest.raises(DamagedStoreError, match="truncated"):
        check_data_file(data)


def test_cli_exits_1_on_a_truncated_store_without_a_signal(tmp_path):
    data = fill(tmp_path / "s")
    os.truncate(data, data.stat().st_size // 2)
    done = subprocess.run([sys.executable, "-m", "chunkcache.cli", "info", "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "truncated" in done.stderr and "SIGBUS" in done.stderr


def test_records_round_trip_and_detect_every_single_byte_flip():
    meta = {"text": "héllo", "token_ids": [1, 2, 3], "id": 7}
    emb = np.linspace(-1, 1, 8, dtype=np.float32)
    meta_bytes, emb_bytes = encode_meta(meta), encode_emb(emb)
    assert decode_meta(meta_bytes) == meta
    assert np.array_equal(decode_emb(emb_bytes, 8), emb)
    for buf, decode in ((meta_bytes, decode_meta), (emb_bytes, lambda b: decode_emb(b, 8))):
        for i in range(len(buf)):
            flipped = bytearray(buf)
            flipped[i] ^= 0x10
            with pytest.raises(CorruptEntryError):
                decode(bytes(flipped))


def test_legacy_meta_and_embeddings_stay_readable(tmp_path):
    fill(tmp_path / "s", n=2)
    key = make_key(0)
    raw_put(tmp_path / "s", "meta", key, json.dumps({"source": "old.txt", "id": 0}).encode())
    raw_put(tmp_path / "s", "emb", key, np.full(4, 0.5, np.float32).tobytes())
    with KVStore(tmp_path / "s") as store:
        assert store.get_meta(key) == {"source": "old.txt", "id": 0}
        ids, vecs = store.embeddings()
        assert ids.tolist() == [0, 1] and vecs[0].tolist() == [0.5] * 4
        assert store.scan()["legacy"] == [key]


def test_damaged_meta_and_embedding_are_detected_not_silent(tmp_path):
    fill(tmp_path / "s", n=3)
    for db_name, key in (("meta", make_key(0)), ("emb", make_key(1))):
        value = bytearray(raw_get(tmp_path / "s", db_name, key))
        value[-1] ^= 0x01
        raw_put(tmp_path / "s", db_name, key, bytes(value))
    with KVStore(tmp_path / "s") as store:
        with pytest.raises(CorruptEntryError, match=f"metadata of chunk {make_key(0).hex()[:16]}.*checksum"):
            store.get_meta(make_key(0))
        ids, _ = store.embeddings()
        assert ids.tolist() == [0, 2]  # the damaged embedding is left out, not returned changed
        assert store.damage["emb"] == 1
        found = store.scan()
        assert found["meta"] == [make_key(0)] and found["emb"] == [make_key(1)] and found["kv"] == []


def test_put_over_damaged_meta_rewrites_the_chunk_under_its_id(tmp_path):
    fill(tmp_path / "s", n=3)
    raw_put(tmp_path / "s", "meta", make_key(1), b"CCM1garbage-garbage")
    with KVStore(tmp_path / "s") as store:
        before = store.stats()
        assert store.put_chunks([make_item(1, num_tokens=40)]) == {make_key(1): 1}
        assert store.get_meta(make_key(1))["id"] == 1
        assert store.stats()["kv_bytes"] == before["kv_bytes"] and len(store) == 3


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (needs root; skipped elsewhere)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_is_a_clear_error_and_the_store_stays_consistent(tiny_disk):
    with KVStore(tiny_disk / "s", map_size=1 << 24) as store:
        written = 0
        with pytest.raises(DiskFullError, match="disk full: .*store is unchanged and queries"):
            for i in range(200):
                store.put_chunks([make_item(i, num_tokens=200)])
                written += 1
        assert 0 < written < 200
        assert len(store) == written and store.stats()["num_tokens"] == 200 * written
        with store.reader() as r:  # reads still work on the full disk
            for i in range(written):
                assert torch.equal(r.kv(make_key(i)).view(torch.int16), make_item(i, 200)[1].view(torch.int16))
    assert sorted(p.name for p in (tiny_disk / "s").rglob("*")) == ["data.mdb", "kv.lmdb", "lock.mdb"]


def entry(i, *, corpus=False, last_used=0.0, uses=0, num_tokens=100, num_bytes=None):
    return EntryStats(bytes([i]) * 32, i, num_bytes or num_tokens * 100, num_tokens, corpus, last_used, uses)


def test_eviction_order_requests_by_weighted_recency_then_corpus_blind_to_use():
    now = 1000.0
    old, recent, busy = entry(1, last_used=100), entry(2, last_used=990), entry(3, last_used=100, uses=50)
    corpus_used, corpus_cold = entry(4, corpus=True, uses=999, last_used=999), entry(5, corpus=True)
    order = [e.chunk_id for e in eviction_order([corpus_used, busy, recent, corpus_cold, old], now)]
    # busy: 51 uses over 900 s beats recent: 1 use over 10 s? no: 51/900 < 1/10, so busy goes before recent.
    assert order == [1, 3, 2, 5, 4]  # corpus ties on cost per byte: newest (higher id) first, usage ignored
    cheap = entry(6, corpus=True, num_tokens=10, num_bytes=10_000)  # 10 tokens in 10 kB: cheap per byte
    assert eviction_order([corpus_cold, cheap], now)[0] is cheap
    assert recompute_cost(2048) == 2 * 2048


def test_choose_victims_takes_the_fewest_needed():
    entries = [entry(i, last_used=i) for i in range(1, 6)]  # 10_000 bytes each
    victims = choose_victims(entries, 50_000, 25_000, now=10.0)
    assert [v.chunk_id for v in victims] == [1, 2, 3]
    assert choose_victims(entries, 50_000, 60_000, now=10.0) == []
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        choose_victims(entries, 1, -1, now=0.0)


def test_cap_evicts_kv_only_and_put_brings_it_back(tmp_path):
    per_chunk = 2 * 3 * 2 * 8 * 2 * 10  # make_kv: 10 tokens of fp16
    with KVStore(tmp_path / "s", max_kv_bytes=3 * per_chunk) as store:
        for i in range(4):
            store.put_chunks([make_item(i, num_tokens=10)])
        # The 4th write went over the cap: eviction went down to 90% of it (2.7 chunks), so 2 chunks stay.
        assert store.kv_bytes() == 2 * per_chunk and len(store) == 2
        store.put_chunks([make_item(4, num_tokens=10)])
        assert len(store) == 3 and make_key(4) in store
        evicted = [i for i in range(5) if make_key(i) not in store]
        assert len(evicted) == 2
        for i in evicted:  # text, metadata and embedding stay: still retrievable
            assert store.get_meta(make_key(i))["id"] == i and store.embedding(make_key(i)) is not None
        assert store.embeddings()[0].tolist() == [0, 1, 2, 3, 4]
        store.max_kv_bytes = None
        assert store.put_chunks([make_item(evicted[0], num_tokens=10)]) == {make_key(evicted[0]): evicted[0]}
        assert make_key(evicted[0]) in store and store.stats()["num_tokens"] == 40


def test_evict_to_prefers_unused_request_entries(tmp_path):
    with KVStore(tmp_path / "s") as store:
        store.put_chunks([make_item(0, num_tokens=10)])  # corpus (has an embedding)
        store.put_chunks([(make_key(i), make_kv(10, i), {}, None) for i in (1, 2)])  # request entries
        store.touch([make_key(2)])
        assert store.evict_to(store.kv_bytes() - 1) == (1, 1920)
        assert make_key(1) not in store and make_key(0) in store and make_key(2) in store
        store.evict_to(0, protect=[make_key(0)])
        assert make_key(0) in store and make_key(2) not in store


def test_delete_chunks_moves_the_watermark_and_totals(tmp_path):
    with KVStore(tmp_path / "s") as store:
        store.put_chunks([make_item(i, num_tokens=10) for i in range(4)])
        assert store.watermark() == (4, 0)
        assert store.delete_chunks([make_key(1), make_key(3), make_key(9)]) == 2
        assert store.watermark() == (4, 2)
        assert store.key_for_id([1, 3]) == [None, None] and len(store) == 2
        assert store.embeddings()[0].tolist() == [0, 2] and store.stats()["num_tokens"] == 20
        assert store.embeddings(since_id=1)[0].tolist() == [2]


def test_a_store_from_before_the_usage_table_opens_readonly_and_gains_it_on_write(tmp_path):
    fill(tmp_path / "s", n=2)
    env = lmdb.open(str(tmp_path / "s" / "kv.lmdb"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"usage", txn=txn), delete=True)
    env.close()
    with KVStore(tmp_path / "s", readonly=True) as store:
        assert len(store) == 2 and store.get_meta(make_key(0))["id"] == 0
        store.touch([make_key(0)])  # buffered; a readonly store never writes it
    with KVStore(tmp_path / "s") as store:
        store.put_chunks([(make_key(5), make_kv(10, 5), {}, None)])
        assert store.evict_to(0) == (3, 2 * 7680 + 1920)  # two 40-token chunks and one of 10 tokens
        assert store.kv_bytes() == 0 and store.get_meta(make_key(5)) == {"id": 2}
