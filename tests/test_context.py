"""Context-enriched chunk entries (chunkcache/context.py): computed at ingest, placed for chunks 2..k, and
kept consistent by the store's lifecycle (retire, evict, repair, an interrupted ingest)."""
from __future__ import annotations

import logging

import pytest
import torch

from chunkcache import RAGPipeline
from chunkcache.blend import PromptLayout, chunk_key_bias
from chunkcache.forward import forward_tokens
from chunkcache.kvcompute import context_chunk_kv, prefix_cache
from chunkcache.kvcache import new_cache
from chunkcache.prompt import chunk_token_ids
from chunkcache.repair import repair_store, verify_store
from store import chunk_key

from .conftest import DOCS, open_tiny_pipe
from .test_pipeline_faults import flip

QUESTION = "Which river carries the most water?"
FORCED = [1000, 2000, 3000, 4000]


def links(pipe) -> dict[bytes, dict]:
    """chunk key -> its enriched entry's metadata, for every indexed chunk."""
    kv = pipe.rt.store.kv
    ids, _ = kv.embeddings()
    out = {}
    for key in kv.key_for_id(ids):
        meta = kv.get_meta(key)
        if meta.get("context_key"):
            out[key] = kv.get_meta(bytes.fromhex(meta["context_key"]))
    return out


def test_an_enriched_entry_placed_after_its_context_is_what_full_prefill_computes(tiny_lm, tokenizer):
    prefix = [1, 2, 3, 4, 5]
    context = chunk_token_ids(tokenizer, DOCS[0])
    chunk = chunk_token_ids(tokenizer, DOCS[1])
    ids = torch.tensor(prefix + context + chunk)
    full = new_cache(tiny_lm, len(ids))
    forward_tokens(tiny_lm, full, ids, torch.arange(len(ids)))
    scratch = prefix_cache(tiny_lm, prefix, len(prefix) + len(context) + len(chunk))
    entry = context_chunk_kv(tiny_lm, scratch, len(prefix), context, chunk, torch.float32)
    # Stored at the plain entry's positions: moving it by len(context) puts it where full prefill computed it.
    from chunkcache.rope import rerotate_layers

    n, at = len(chunk), len(prefix) + len(context)
    keys = torch.empty_like(entry[0])
    rerotate_layers(entry[0], torch.full((n,), len(context)), tiny_lm.ropes, out=keys)
    torch.testing.assert_close(keys, full.k[:, :, at:at + n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entry[1], full.v[:, :, at:at + n], rtol=1e-5, atol=1e-5)


def test_an_enriched_entry_over_the_neighbours_stored_kv_is_the_one_computed_from_its_ids(tiny_lm, tokenizer):
    prefix, context, chunk = [1, 2, 3], chunk_token_ids(tokenizer, DOCS[0]), chunk_token_ids(tokenizer, DOCS[2])
    scratch = prefix_cache(tiny_lm, prefix, len(prefix) + len(context) + len(chunk))
    from_ids = context_chunk_kv(tiny_lm, scratch, len(prefix), context, chunk, torch.float32)
    ids = torch.tensor(context)
    forward_tokens(tiny_lm, scratch, ids, torch.arange(len(prefix), len(prefix) + len(ids)))
    stored = torch.stack((scratch.k[:, :, 3:3 + len(ids)], scratch.v[:, :, 3:3 + len(ids)])).clone()
    placed = context_chunk_kv(tiny_lm, scratch, len(prefix), context, chunk, torch.float32, context_kv=stored)
    torch.testing.assert_close(placed, from_ids, rtol=1e-5, atol=1e-5)


def test_a_context_changes_the_key_and_no_context_leaves_plain_keys_as_they_were():
    plain = chunk_key("fp", [1, 2], [3, 4], kv_dtype="float16")
    assert chunk_key("fp", [1, 2], [3, 4], kv_dtype="float16", context_ids=()) == plain
    with_context = chunk_key("fp", [1, 2], [3, 4], kv_dtype="float16", context_ids=[9])
    assert with_context != plain
    assert with_context != chunk_key("fp", [1, 2], [3, 4], kv_dtype="float16", context_ids=[8])
    assert with_context != chunk_key("fp", [1, 2, 9], [3, 4], kv_dtype="float16")


def test_ingest_links_every_chunk_to_an_entry_after_its_nearest_neighbour(tiny_pipe):
    report = tiny_pipe.ingest_texts(DOCS, progress=False)
    assert report.context_entries == 3 and report.context_tokens > 0 and "context-enriched" in report.summary()
    linked = links(tiny_pipe)
    assert len(linked) == 3
    for key, entry in linked.items():
        assert entry["kind"] == "context" and entry["of"] == key.hex() and entry["neighbour"] != key.hex()
        neighbour = tiny_pipe.rt.store.kv.get_meta(bytes.fromhex(entry["neighbour"]))
        assert entry["context_ids"] == neighbour["token_ids"]
    again = tiny_pipe.ingest_texts(DOCS, progress=False)
    assert again.files_unchanged == 3 and again.context_entries == 0
    answer = tiny_pipe.query(QUESTION, top_k=3, mode="reuse", max_new_tokens=2)
    assert answer.stats.context_chunks == 2  # every chunk but the first
    assert tiny_pipe.query(QUESTION, top_k=3, mode="full", max_new_tokens=2).stats.context_chunks == 0


def test_a_plain_store_computes_no_enriched_entries_and_keeps_its_recipe(tmp_path, tiny_lm, hash_embedder):
    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, chunk_context="none") as pipe:
        report = pipe.ingest_texts(DOCS, progress=False)
        assert report.context_entries == 0 and links(pipe) == {}
        assert pipe.query(QUESTION, top_k=3, mode="reuse", max_new_tokens=2).stats.context_chunks == 0
    with pytest.raises(ValueError, match="chunk_context"):
        open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, chunk_context="neighbour")
    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder) as pipe:  # the store's recipe, not the default
        assert pipe.config.chunk_context == "none"


def test_reuse_of_a_chunk_placed_after_the_neighbour_it_was_computed_after_equals_full(tmp_path, tiny_lm,
                                                                                      hash_embedder):
    """Two chunks, each the other's neighbour: in the prompt [first, second] the second's enriched entry
    saw exactly the prompt before it, so reuse with no scale is full prefill (to fp32 rounding)."""
    docs = DOCS[:2]
    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder) as pipe:
        pipe.ingest_texts(docs, progress=False)
        full, _ = pipe.score(QUESTION, FORCED, documents=docs, mode="full")
        reuse, stats = pipe.score(QUESTION, FORCED, documents=docs, mode="reuse", chunk_scale="off")
        assert stats.context_chunks == 1
        torch.testing.assert_close(reuse, full, rtol=1e-4, atol=1e-4)
        plain, _ = pipe.score(QUESTION, FORCED, documents=docs[::-1], mode="reuse", chunk_scale="off")
        assert not torch.allclose(plain[0], full[0], atol=1e-3)  # the test can fail: order matters


def test_a_missing_or_damaged_enriched_entry_falls_back_to_the_plain_one(tmp_path, tiny_lm, hash_embedder, caplog):
    with open_tiny_pipe(tmp_path / "plain", tiny_lm, hash_embedder, chunk_context="none") as plain:
        plain.ingest_texts(DOCS, progress=False)
        expected = plain.score(QUESTION, FORCED, top_k=3, mode="reuse", chunk_scale="off")[0]
    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder) as pipe:
        pipe.ingest_texts(DOCS, progress=False)
        order = [bytes.fromhex(s.key) for s in pipe.retrieve(QUESTION, top_k=3)]
        linked = [bytes.fromhex(pipe.rt.store.kv.get_meta(k)["context_key"]) for k in order[1:]]
        flip(pipe, "kv", linked[0], offset=200)
        pipe.rt.store.kv.delete_chunks(linked[1:])
        with caplog.at_level(logging.WARNING):
            got, stats = pipe.score(QUESTION, FORCED, top_k=3, mode="reuse", chunk_scale="off")
        assert stats.context_chunks == 0 and stats.chunk_hits == 3 and stats.damaged_chunks == 0
        assert "plain entry" in caplog.text
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The next ingest computes what is gone (the deleted ones) for the sources it processes.
        assert pipe.ingest_texts(DOCS, progress=False).context_entries == 0  # unchanged sources are skipped
        report, found = verify_store(pipe.rt.store)
        assert found["kv"] == [linked[0]]
        repair_store(pipe.rt)
        assert pipe.score(QUESTION, FORCED, top_k=3, mode="reuse")[1].context_chunks >= 1


def test_repair_recomputes_a_damaged_enriched_entry_after_its_context(tiny_pipe):
    tiny_pipe.ingest_texts(DOCS, progress=False)
    key = bytes.fromhex(next(iter(links(tiny_pipe).values()))["of"])
    context_key = bytes.fromhex(tiny_pipe.rt.store.kv.get_meta(key)["context_key"])
    with tiny_pipe.rt.store.kv.reader() as r:
        before = r.kv(context_key).clone()
    flip(tiny_pipe, "kv", context_key, offset=300)
    assert verify_store(tiny_pipe.rt.store)[1]["kv"] == [context_key]
    assert repair_store(tiny_pipe.rt).repaired["kv"] == 1
    with tiny_pipe.rt.store.kv.reader() as r:
        torch.testing.assert_close(r.kv(context_key), before)


def test_retiring_a_chunk_retires_its_enriched_entry(tmp_path, tiny_pipe):
    tiny_pipe.ingest_texts([{"text": t, "source": f"s{i}"} for i, t in enumerate(DOCS)], progress=False)
    everest = next(k for k in links(tiny_pipe) if "Everest" in tiny_pipe.rt.store.kv.get_meta(k)["text"])
    context_key = bytes.fromhex(tiny_pipe.rt.store.kv.get_meta(everest)["context_key"])
    edited = DOCS[1].replace("highest", "tallest")
    report = tiny_pipe.ingest_texts([{"text": edited, "source": "s1"}], progress=False)
    assert report.chunks_retired == 1 and report.context_entries == 1
    assert tiny_pipe.rt.store.kv.get_meta(everest) is None and tiny_pipe.rt.store.kv.get_meta(context_key) is None
    # The edited chunk's neighbour is another chunk, never the version of itself it replaced.
    (entry,) = [e for e in links(tiny_pipe).values() if "tallest" in tiny_pipe.rt.lm.tokenizer.decode(e["token_ids"])]
    assert entry["neighbour"] != everest.hex() and tiny_pipe.rt.store.kv.get_meta(bytes.fromhex(entry["neighbour"]))


def test_the_first_document_is_enriched_once_it_has_a_neighbour(tiny_pipe):
    first = tiny_pipe.ingest_texts([DOCS[0]], progress=False)
    assert first.context_entries == 0 and links(tiny_pipe) == {}  # nothing to be enriched by yet
    assert not any(r.get("enriched") for r in tiny_pipe.rt.store.kv.sources().values())
    second = tiny_pipe.ingest_texts(DOCS[:2], progress=False)
    assert second.files_unchanged == 1 and second.context_entries == 2 and len(links(tiny_pipe)) == 2
    assert all(r.get("enriched") for r in tiny_pipe.rt.store.kv.sources().values())
    third = tiny_pipe.ingest_texts(DOCS[:2], progress=False)
    assert third.files_unchanged == 2 and third.context_entries == 0


def test_an_outage_of_the_shared_store_serves_plain_entries(tmp_path, tiny_lm, hash_embedder):
    from store.redislocal import LocalRedis

    server = LocalRedis(tmp_path / "r")
    try:
        with RAGPipeline.open(server.url, lm=tiny_lm, embedder=hash_embedder, kv_dtype="float32", chunk_tokens=48,
                              max_new_tokens=4) as pipe:
            pipe.ingest_texts(DOCS, progress=False)
            assert pipe.query(QUESTION, top_k=3, mode="reuse").stats.context_chunks == 2
            server.stop()
            # Documents whose metadata this process never read: the link lookup itself meets the outage.
            unseen = [f"{d} (revised)" for d in DOCS]
            for kwargs in ({"top_k": 3}, {"documents": DOCS[::-1]}, {"documents": unseen}):
                answer = pipe.query(QUESTION, mode="blend", **kwargs)
                assert answer.stats.store_unavailable and answer.stats.context_chunks == 0
    finally:
        server.stop()


def test_an_ingest_stopped_before_its_enriched_entries_finishes_them_next_time(tiny_pipe, monkeypatch):
    import chunkcache.ingest

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chunkcache.ingest, "enrich_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_pipe.ingest_texts(DOCS, progress=False)
    monkeypatch.undo()
    report = tiny_pipe.ingest_texts(DOCS, progress=False)
    assert report.files_unchanged == 3 and report.chunks_computed == 0 and report.context_entries == 3
    assert all(r.get("enriched") for r in tiny_pipe.rt.store.kv.sources().values())


def test_entries_evicted_under_a_size_cap_are_not_recomputed_by_every_ingest(tmp_path, tiny_lm, hash_embedder):
    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder) as pipe:
        pipe.ingest_texts(DOCS, progress=False)
        pipe.rt.store.kv.delete_chunks([bytes.fromhex(m["context_key"]) for m in
                                        (pipe.rt.store.kv.get_meta(k) for k in links(pipe))])  # as an eviction
        again = pipe.ingest_texts(DOCS, progress=False)
        assert again.files_unchanged == 3 and again.context_entries == 0  # marked by their links: not retried
        assert pipe.query(QUESTION, top_k=3, mode="reuse").stats.context_chunks == 0  # plain entries serve


def test_enriched_entries_travel_through_the_shared_tier(tmp_path, redis_url, tiny_lm, hash_embedder):
    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder) as lmdb:
        lmdb.ingest_texts(DOCS, progress=False)
        expected = lmdb.query(QUESTION, top_k=3, mode="blend")
    with RAGPipeline.open(redis_url, lm=tiny_lm, embedder=hash_embedder, kv_dtype="float32", chunk_tokens=48,
                          max_new_tokens=8) as redis:
        assert redis.ingest_texts(DOCS, progress=False).context_entries == 3
        got = redis.query(QUESTION, top_k=3, mode="blend")
    assert got.stats.context_chunks == 2 and got.token_ids == expected.token_ids


def test_an_enriched_chunk_takes_its_own_scale():
    layout = PromptLayout(2, (3, 4, 5), 2)
    base = torch.full((2, 1), -1.0)
    bias = chunk_key_bias(layout, base, 20, own={1: torch.full((2, 1), -0.2), 2: None})
    assert bias.shape == (2, 1, 20)
    assert (bias[:, :, :5] == 0).all() and (bias[:, :, 5:9] == -0.2).all() and (bias[:, :, 9:14] == 0).all()
    per_head = chunk_key_bias(layout, None, 20, own={2: torch.full((2, 3), -0.5)})
    assert per_head.shape == (2, 3, 20) and (per_head[:, :, 9:14] == -0.5).all() and (per_head[:, :, :9] == 0).all()
    with pytest.raises(ValueError, match="not a stale chunk"):
        chunk_key_bias(layout, base, 20, own={0: base})
    torch.testing.assert_close(chunk_key_bias(layout, base, 20), chunk_key_bias(layout, base, 20, own={}))


def test_the_server_counts_the_enriched_chunks_it_placed(tiny_pipe):
    from fastapi.testclient import TestClient

    from chunkcache.server import create_app

    tiny_pipe.ingest_texts(DOCS, progress=False)
    with TestClient(create_app(tiny_pipe)) as client:
        r = client.post("/query", json={"question": QUESTION, "top_k": 3, "mode": "reuse", "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["stats"]["context_chunks"] == 2
        assert "chunkcache_context_chunks_total 2.0" in client.get("/metrics").text
