"""Replicas sharing one Redis: hits across replicas, the shared index, eviction by Redis, damaged shared
entries, outages and tenants. Real redis-server processes; the tiny random model."""
import logging
import time

import pytest
import torch
from fastapi.testclient import TestClient

from chunkcache import RAGPipeline
from store.redisstore import RedisStore

from .conftest import RedisServer

QUESTION = "Which river carries the most water?"
# Plain entries: these tests count what the tiers hold and compare answers computed without the store (an outage
# places plain entries); context-enriched entries through Redis: test_context.py.
SETTINGS = dict(kv_dtype="float32", chunk_tokens=48, max_new_tokens=8, top_k=3, chunk_context="none")
MORE_DOCS = [f"Lake number {i} lies in the district of Vale {i}. Its water is cold and {i} metres deep."
             for i in range(40)]


def replica(store, tiny_lm, hash_embedder, **overrides):
    return RAGPipeline.open(store, lm=tiny_lm, embedder=hash_embedder, **(SETTINGS | overrides))


def answer_tokens(pipe, question=QUESTION, **kwargs):
    answer = pipe.query(question, mode="blend", **kwargs)
    return answer.token_ids, answer.stats


@pytest.fixture
def lmdb_reference(tmp_path, tiny_lm, hash_embedder, docs):
    pipe = replica(tmp_path / "reference", tiny_lm, hash_embedder)
    pipe.ingest_texts(docs, progress=False)
    yield pipe
    pipe.close()


def test_a_chunk_computed_on_one_replica_is_a_hit_on_another(redis_url, tiny_lm, hash_embedder, docs,
                                                               lmdb_reference):
    a = replica(redis_url, tiny_lm, hash_embedder)
    b = replica(redis_url, tiny_lm, hash_embedder)  # opened before anything was ingested
    a.ingest_texts(docs, progress=False)
    tokens_b, stats_b = answer_tokens(b)  # B's index catches up by id; every chunk is a hit
    assert stats_b.chunk_hits == 3 and stats_b.chunk_misses == 0
    assert tokens_b == answer_tokens(a)[0] == answer_tokens(lmdb_reference)[0]
    # Request documents computed through A are hits on B too, with the same answer.
    new = ["The Danube flows through ten countries before it reaches the Black Sea."]
    tokens_a, stats_a = answer_tokens(a, documents=new)
    tokens_b, stats_b = answer_tokens(b, documents=new)
    assert (stats_a.chunk_misses, stats_b.chunk_misses, stats_b.chunk_hits) == (1, 0, 1)
    assert tokens_a == tokens_b
    a.close()
    b.close()


def test_tenants_stay_apart_across_replicas(redis_url, tiny_lm, hash_embedder, docs):
    a = replica(redis_url, tiny_lm, hash_embedder)
    b = replica(redis_url, tiny_lm, hash_embedder)
    secret = ["Project Kestrel ships on the ninth of March."]
    assert answer_tokens(a, documents=secret, namespace="tenant-a")[1].chunk_misses == 1
    assert answer_tokens(b, documents=secret, namespace="tenant-b")[1].chunk_misses == 1  # not tenant-a's
    assert answer_tokens(b, documents=secret, namespace="tenant-a")[1].chunk_hits == 1
    a.close()
    b.close()


def test_a_damaged_shared_entry_is_recomputed_and_overwritten(redis_url, tiny_lm, hash_embedder, docs,
                                                              lmdb_reference):
    pipe = replica(redis_url, tiny_lm, hash_embedder)
    pipe.ingest_texts(docs, progress=False)
    far = pipe.rt.store.kv
    key = pipe.retrieve(QUESTION, top_k=1)[0].key
    buf = bytearray(far.client.get(far.kv_name(bytes.fromhex(key))))
    buf[-3] ^= 0x55
    far.client.set(far.kv_name(bytes.fromhex(key)), bytes(buf))
    tokens, stats = answer_tokens(pipe)
    assert stats.damaged_chunks == 1 and stats.chunk_misses == 1
    assert tokens == answer_tokens(lmdb_reference)[0]
    assert far.scan()["kv"] == []  # overwritten with the recomputed entry
    assert answer_tokens(pipe)[1].chunk_hits == 3
    pipe.close()


def test_redis_eviction_is_a_miss_never_an_error(tmp_path, tiny_lm, hash_embedder, docs):
    """maxmemory with volatile-lru: Redis evicts KV entries only; their chunks stay retrievable and are
    recomputed and stored again on use."""
    server = RedisServer(tmp_path / "r", policy="volatile-lru")
    try:
        client = server.client()  # room for about 15 of the 43 chunks' KVs above what Redis uses empty
        client.config_set("maxmemory", client.info("memory")["used_memory"] + 500_000)
        reference = replica(tmp_path / "reference", tiny_lm, hash_embedder)
        pipe = replica(server.url, tiny_lm, hash_embedder)
        for p in (reference, pipe):
            p.ingest_texts(docs + MORE_DOCS, progress=False)
        far = pipe.rt.store.kv
        def count(name: bytes) -> int:
            return sum(1 for _ in far.client.scan_iter(match=name + b"*"))

        assert count(far.kv_name(b"")) < len(docs + MORE_DOCS) // 2  # Redis evicted KVs ...
        chunks = len(docs + MORE_DOCS)
        assert count(far.meta_name(b"")) == chunks + 1 and count(far._emb_prefix) == chunks  # ... nothing else
        for question in [QUESTION] + [f"How deep is lake number {i}?" for i in (0, 13, 39)]:
            assert answer_tokens(pipe, question)[0] == answer_tokens(reference, question)[0]
        reference.close()
        pipe.close()
    finally:
        server.stop()


@pytest.mark.parametrize("tiered", [False, True], ids=["redis", "lmdb+redis"])
def test_redis_down_mid_service_computes_locally_and_recovers(tmp_path, tiny_lm, hash_embedder, docs, tiered,
                                                             lmdb_reference, caplog):
    server = RedisServer(tmp_path / "r", persist=True)
    spec = f"lmdb:{tmp_path / 'near'}+{server.url}" if tiered else server.url
    pipe = replica(spec, tiny_lm, hash_embedder)
    pipe.ingest_texts(docs, progress=False)
    expected = answer_tokens(lmdb_reference)[0]
    assert answer_tokens(pipe)[0] == expected
    server.stop()
    with caplog.at_level(logging.WARNING):
        tokens, stats = answer_tokens(pipe)
    assert tokens == expected and stats.store_unavailable
    # Redis alone: every chunk is computed here. With a near cache: read from it.
    assert (stats.chunk_misses, stats.chunk_hits) == ((0, 3) if tiered else (3, 0))
    assert "unreachable" in caplog.text
    with TestClient(_app(pipe)) as client:
        assert client.post("/query", json={"question": QUESTION, "mode": "blend"}).status_code == 200
        metrics = client.get("/metrics").text
    assert "chunkcache_store_unavailable_requests_total 1.0" in metrics
    server.start()
    time.sleep(1.1)  # past the store's fail-fast window after a failure
    tokens, stats = answer_tokens(pipe)
    assert tokens == expected and not stats.store_unavailable and stats.chunk_hits == 3
    pipe.close()
    server.stop()


def _app(pipe):
    from chunkcache.server import create_app

    return create_app(pipe)


def test_the_near_cache_keeps_copies_of_what_it_read(tmp_path, redis_url, tiny_lm, hash_embedder, docs):
    writer = replica(redis_url, tiny_lm, hash_embedder)
    writer.ingest_texts(docs, progress=False)
    pipe = replica(f"lmdb:{tmp_path / 'near'}+{redis_url}", tiny_lm, hash_embedder)
    near = pipe.rt.store.kv.near
    assert len(near) == 0
    assert answer_tokens(pipe)[1].chunk_hits == 3
    assert len(near) == 4  # the three chunks and the prompt prefix, copied on first read
    keys = [bytes.fromhex(s.key) for s in pipe.retrieve(QUESTION)]
    with near.reader() as r, writer.rt.store.kv.reader() as shared:
        for key in keys:
            assert torch.equal(r.kv(key), shared.kv(key))
    writer.close()
    pipe.close()


def test_cli_refuses_ray_without_a_shared_store(tmp_path, capsys):
    from chunkcache.cli import main

    assert main(["ingest", str(tmp_path), "--store", str(tmp_path / "s"), "--ray"]) == 1
    assert "--ray needs a shared store" in capsys.readouterr().err


def test_cli_query_names_an_empty_redis_store(redis_url, capsys):
    from chunkcache.cli import main

    assert main(["query", "q", "--store", redis_url]) == 1
    assert "no store at redis://" in capsys.readouterr().err


def test_redis_store_rejects_a_store_built_by_another_model(redis_url, tiny_lm, hash_embedder, docs, tokenizer):
    from .conftest import make_tiny_lm

    replica(redis_url, tiny_lm, hash_embedder).close()
    with pytest.raises(Exception, match="different model"):
        replica(redis_url, make_tiny_lm(tokenizer, seed=5), hash_embedder)
    assert RedisStore(redis_url).manifest["model"] == tiny_lm.spec


def test_copy_moves_an_lmdb_store_into_redis(tmp_path, redis_url, tiny_lm, hash_embedder, docs, lmdb_reference,
                                             capsys):
    from chunkcache.cli import main

    lmdb_reference.close()  # written; the CLI opens it read-only
    assert main(["copy", "--from", str(tmp_path / "reference"), "--to", redis_url]) == 0
    assert "copied 4 chunks and 3 source records" in capsys.readouterr().out  # 3 documents and the prefix
    pipe = replica(redis_url, tiny_lm, hash_embedder)
    reference = replica(tmp_path / "reference", tiny_lm, hash_embedder)
    assert pipe.rt.store.kv.embeddings()[0].tolist() == reference.rt.store.kv.embeddings()[0].tolist()
    tokens, stats = answer_tokens(pipe)
    assert stats.chunk_hits == 3 and tokens == answer_tokens(reference)[0]
    assert main(["copy", "--from", str(tmp_path / "nothing"), "--to", redis_url]) == 1
    pipe.close()
    reference.close()


def test_verify_and_repair_a_redis_store(redis_url, tiny_lm, hash_embedder, docs, lmdb_reference):
    from chunkcache.repair import repair_store, verify_store

    pipe = replica(redis_url, tiny_lm, hash_embedder)
    pipe.ingest_texts(docs, progress=False)
    far = pipe.rt.store.kv
    keys = [bytes.fromhex(s.key) for s in pipe.retrieve(QUESTION)]
    for name in (far.kv_name(keys[0]), far._emb_prefix + keys[1]):
        buf = bytearray(far.client.get(name))
        buf[-1] ^= 0x01
        far.client.set(name, bytes(buf))
    report, _ = verify_store(pipe.rt.store)
    assert not report.clean and report.damaged == {"kv": 1, "meta": 0, "emb": 1}
    repaired = repair_store(pipe.rt)
    assert repaired.repaired == {"kv": 1, "emb": 1}
    assert verify_store(pipe.rt.store)[0].clean
    assert answer_tokens(pipe)[0] == answer_tokens(lmdb_reference)[0]
    pipe.close()
