"""Accounting of what a request read and wrote (issue 9, items 1 and 6): `cached_tokens` counts only KV read
from the store; request `documents` are charged to their tenant's quota, or not stored at all."""
from __future__ import annotations

import pytest

from fastapi.testclient import TestClient

from chunkcache import RAGPipeline
from chunkcache.server import ServerSettings, create_app

from .conftest import DOCS

Q = "Where is Mount Everest?"
BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # K and V, 4 layers, 2 KV heads, head_dim 16, float32: the tiny model


def open_pipe(tmp_path, tiny_lm, hash_embedder, **overrides) -> RAGPipeline:
    return RAGPipeline.open(tmp_path / "store", lm=tiny_lm, embedder=hash_embedder, kv_dtype="float32",
                            chunk_tokens=48, max_new_tokens=4, **overrides)


def chunk_lens(pipe, answer) -> list[int]:
    return [len(pipe.rt.store.kv.get_meta(bytes.fromhex(s.key))["token_ids"]) for s in answer.sources]


def test_a_miss_is_not_cached(tiny_pipe):
    prefix_len = len(tiny_pipe.rt.template.prefix_ids)
    first = tiny_pipe.query(Q, documents=DOCS[:1], mode="reuse", max_new_tokens=1)
    assert first.stats.chunk_misses == 1 and first.stats.cached_tokens == 0  # prefix and chunk computed now
    second = tiny_pipe.query(Q, documents=DOCS[:1], mode="reuse", max_new_tokens=1)
    assert second.stats.chunk_hits == 1
    assert second.stats.cached_tokens == prefix_len + chunk_lens(tiny_pipe, second)[0]
    mixed = tiny_pipe.query(Q, documents=DOCS[:2], mode="reuse", max_new_tokens=1)
    assert [s.hit for s in mixed.sources] == [True, False]
    assert mixed.stats.cached_tokens == prefix_len + chunk_lens(tiny_pipe, mixed)[0]


def test_blend_counts_read_tokens_it_did_not_recompute(tiny_pipe):
    tiny_pipe.query(Q, documents=DOCS, mode="reuse", max_new_tokens=1)  # store them
    answer = tiny_pipe.query(Q, documents=DOCS, mode="blend", recompute_ratio=0.3, max_new_tokens=1)
    s = answer.stats
    suffix_len = s.prompt_tokens - len(tiny_pipe.rt.template.prefix_ids) - sum(chunk_lens(tiny_pipe, answer))
    assert s.chunk_hits == 3 and s.cached_tokens == s.prompt_tokens - s.recomputed_tokens
    assert s.recomputed_tokens > suffix_len  # some chunk tokens were recomputed, and not counted


def test_document_quota_stores_what_fits_and_serves_the_rest(tmp_path, tiny_lm, hash_embedder):
    probe = open_pipe(tmp_path / "probe", tiny_lm, hash_embedder)
    sizes = chunk_lens(probe, probe.query(Q, documents=DOCS, mode="reuse"))
    probe.close()
    quota = (sizes[0] + sizes[1]) * BYTES_PER_TOKEN  # the first two documents fit, the third does not
    pipe = open_pipe(tmp_path, tiny_lm, hash_embedder, document_quota_bytes=quota)
    try:
        first = pipe.query(Q, documents=DOCS, mode="reuse", namespace="team-a")
        assert first.stats.chunk_misses == 3 and first.stats.unstored_chunks == 1
        again = pipe.query(Q, documents=DOCS, mode="reuse", namespace="team-a")
        assert [s.hit for s in again.sources] == [True, True, False] and again.stats.unstored_chunks == 1
        assert again.token_ids == first.token_ids  # the unstored document is served all the same
        assert pipe.rt.store.kv.document_bytes("team-a") == quota
        # Another tenant has a quota of its own.
        other = pipe.query(Q, documents=DOCS[2:], mode="reuse", namespace="team-b")
        assert other.stats.unstored_chunks == 0
        assert pipe.rt.store.kv.document_bytes("team-b") == sizes[2] * BYTES_PER_TOKEN
    finally:
        pipe.close()


def test_a_flood_of_200_document_requests_keeps_the_cap_the_quota_and_the_other_tenants_hits(
        tmp_path, tiny_lm, hash_embedder):
    """Issue 9's figure, through the HTTP API: one tenant sends 200 requests of new text. The quota keeps
    what it stores small; the cap is the backstop for the store as a whole (its eviction is tested in
    test_pipeline_faults.py), so the other tenant's documents stay stored and keep hitting."""
    quota = 128 * 1024  # a few of the flood's ~25 KB documents
    cap = 512 * 1024  # the prefix, the victim's three documents (~70 KB) and the quota fit; the flood (~5 MB) not
    pipe = open_pipe(tmp_path, tiny_lm, hash_embedder, document_quota_bytes=quota, max_store_bytes=cap)
    app = create_app(pipe, ServerSettings(api_keys={"key-victim": "victim", "key-flood": "flooder"}))

    def ask(c, key: str, documents: list[str]) -> dict:
        r = c.post("/query", headers={"Authorization": f"Bearer {key}"},
                   json={"question": Q, "documents": documents, "mode": "reuse", "max_new_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["stats"]

    try:
        with TestClient(app) as c:
            assert ask(c, "key-victim", DOCS)["chunk_misses"] == 3
            unstored = 0
            for i in range(200):
                unstored += ask(c, "key-flood", [f"Flood passage {i}: " + "new words " * 10])["unstored_chunks"]
                assert pipe.rt.store.kv.kv_bytes() <= cap
                if i % 50 == 49:
                    assert ask(c, "key-victim", DOCS)["chunk_hits"] == 3
        assert pipe.rt.store.kv.document_bytes("flooder") <= quota
        stored = [m for m in map(pipe.rt.store.kv.get_meta, _keys(pipe)) if m.get("namespace") == "flooder"]
        assert 0 < len(stored) == 200 - unstored
        assert sum(m["num_tokens"] for m in stored) * BYTES_PER_TOKEN <= quota
    finally:
        pipe.close()


def test_documents_need_not_be_persisted(tmp_path, tiny_lm, hash_embedder):
    stored = open_pipe(tmp_path / "stored", tiny_lm, hash_embedder)
    expected = stored.query(Q, documents=DOCS, mode="reuse").token_ids
    stored.close()
    pipe = open_pipe(tmp_path, tiny_lm, hash_embedder, persist_documents=False)
    try:
        for _ in range(2):
            answer = pipe.query(Q, documents=DOCS, mode="reuse")
            assert answer.stats.chunk_misses == 3 and answer.stats.unstored_chunks == 3
            assert answer.token_ids == expected
        assert len(pipe.rt.store.kv) == 1  # the prompt prefix only
        assert pipe.rt.store.kv.document_bytes("") == 0
    finally:
        pipe.close()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_quota_is_refused(tmp_path, tiny_lm, hash_embedder, bad):
    with pytest.raises(ValueError, match="document_quota_bytes"):
        open_pipe(tmp_path, tiny_lm, hash_embedder, document_quota_bytes=bad)


def _keys(pipe) -> list[bytes]:
    ids = range(len(pipe.rt.store.kv) + 1)
    return [k for k in pipe.rt.store.kv.key_for_id(list(ids)) if k is not None]
