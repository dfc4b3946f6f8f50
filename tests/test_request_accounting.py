"""Accounting of what a request read and wrote (issue 9, items 1 and 6): `cached_tokens` counts only KV read
from the store; request `documents` are charged to their tenant's quota, or not stored at all."""
from __future__ import annotations

import pytest

from chunkcache import RAGPipeline

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


def test_a_flood_of_new_documents_stays_within_the_quota(tmp_path, tiny_lm, hash_embedder):
    quota = 128 * 1024  # room for the victim's three documents (~70 KB) and a few of the flood's 20
    pipe = open_pipe(tmp_path, tiny_lm, hash_embedder, document_quota_bytes=quota)
    try:
        pipe.query(Q, documents=DOCS, mode="reuse", namespace="victim")
        for i in range(20):
            pipe.query(Q, documents=[f"Flood passage {i}: " + "new words " * 10], mode="reuse", max_new_tokens=1,
                       namespace="flooder")
        assert pipe.rt.store.kv.document_bytes("flooder") <= quota
        stored = [m for m in map(pipe.rt.store.kv.get_meta, _keys(pipe)) if m.get("namespace") == "flooder"]
        assert 0 < sum(m["num_tokens"] for m in stored) * BYTES_PER_TOKEN <= quota
        assert pipe.query(Q, documents=DOCS, mode="reuse", namespace="victim").stats.chunk_hits == 3
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
