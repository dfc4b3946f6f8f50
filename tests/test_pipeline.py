"""RAGPipeline behaviour: retrieval, documents, misses, streaming, sampling, logprobs and bad input."""
from __future__ import annotations

import pytest
import torch

from chunkcache import QueryError, RAGPipeline
from chunkcache.storedir import StoreError

from .conftest import DOCS

Q = "Where is Mount Everest?"


@pytest.fixture
def ingested(tmp_path, tiny_pipe):
    root = tmp_path / "corpus"
    root.mkdir()
    for i, d in enumerate(DOCS):
        (root / f"{i}.txt").write_text(d)
    tiny_pipe.ingest([root], progress=False)
    return tiny_pipe


def test_retrieval_ranks_by_similarity_and_reports_sources(ingested):
    answer = ingested.query("Everest mountain Himalayas Nepal", top_k=2)
    assert "Everest" in answer.sources[0].text
    assert answer.sources[0].score >= answer.sources[1].score
    assert all(s.hit for s in answer.sources) and answer.stats.chunk_hits == 2
    assert answer.ttft_s > 0 and answer.timings.prefill_s > 0 and answer.stats.completion_tokens >= 1
    assert answer.ttft_s >= answer.timings.retrieve_s + answer.timings.load_s + answer.timings.prefill_s


def test_documents_miss_then_hit(tiny_pipe):
    first = tiny_pipe.query(Q, documents=DOCS)
    assert first.stats.chunk_misses == 3 and not any(s.hit for s in first.sources)
    second = tiny_pipe.query(Q, documents=DOCS)
    assert second.stats.chunk_hits == 3 and second.stats.chunk_misses == 0
    assert second.token_ids == first.token_ids  # a miss is computed exactly as the hit later replays it


def test_one_missing_chunk_is_computed_and_the_request_goes_on(tiny_pipe):
    tiny_pipe.query(Q, documents=DOCS[:2])
    answer = tiny_pipe.query(Q, documents=DOCS)
    assert answer.stats.chunk_hits == 2 and answer.stats.chunk_misses == 1
    assert [s.hit for s in answer.sources] == [True, True, False]


def test_stream_yields_the_same_text_as_query(tiny_pipe):
    pieces = list(tiny_pipe.stream(Q, documents=DOCS, max_new_tokens=6))
    answer = tiny_pipe.query(Q, documents=DOCS, max_new_tokens=6)
    assert "".join(pieces).strip() == answer.text


def test_sampling_is_seeded_and_logprobs_are_reported(tiny_pipe):
    kw = dict(documents=DOCS, temperature=1.0, top_p=0.9, seed=7, max_new_tokens=6, logprobs=3)
    a, b = tiny_pipe.query(Q, **kw), tiny_pipe.query(Q, **kw)
    assert a.token_ids == b.token_ids
    assert len(a.logprobs) >= len(a.token_ids)
    row = a.logprobs[0]
    assert len(row["top_logprobs"]) == 3 and row["logprob"] <= 0
    tops = [t["logprob"] for t in row["top_logprobs"]]
    assert tops == sorted(tops, reverse=True)


def test_greedy_logprob_is_the_top_alternative(tiny_pipe):
    a = tiny_pipe.query(Q, documents=DOCS, max_new_tokens=4, logprobs=2)
    for row in a.logprobs:
        assert row["token_id"] == row["top_logprobs"][0]["token_id"]


def test_context_overflow_drops_lowest_ranked_chunks(tiny_pipe):
    long_doc = "word " * 1100  # ~1,100 tokens; the tiny model's context is 2,048
    answer = tiny_pipe.query(Q, documents=[DOCS[0], long_doc, long_doc], max_new_tokens=2)
    assert answer.stats.dropped_chunks == 1 and len(answer.sources) == 2
    with pytest.raises(QueryError, match="context of 2048"):
        tiny_pipe.query(Q, documents=DOCS, max_new_tokens=2100)


@pytest.mark.parametrize("kwargs,match", [
    (dict(question="  "), "empty"),
    (dict(top_k=-1), "top_k"),
    (dict(mode="fast"), "unknown mode"),
    (dict(recompute_ratio=1.5), r"\[0, 1\]"),
    (dict(recompute_ratio=-0.1), r"\[0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(logprobs=50), "logprobs"),
    (dict(documents=[]), "documents"),
    (dict(documents=["ok", ""]), "empty"),
    (dict(deviation="both"), "deviation"),
    (dict(check_layer=4), r"check_layer=4 but the model has 4 layers; use 0 to 3"),  # the tiny model: 4 layers
    (dict(check_layer=1024), "check_layer=1024"),
    (dict(question="x" * 100_001), "limit"),
    # Long questions are bounded by the model's context (2,048 tokens here), counted in tokens.
    (dict(question="word " * 3000, documents=DOCS), r"exceeds the model's context of 2048 tokens"),
])
def test_bad_requests_are_refused_clearly(tiny_pipe, kwargs, match):
    question = kwargs.pop("question", Q)
    with pytest.raises(QueryError, match=match):
        tiny_pipe.query(question, **kwargs)


def test_check_layer_may_be_the_last_layer(tiny_pipe):
    assert tiny_pipe.query(Q, documents=DOCS, check_layer=3, max_new_tokens=1).config["check_layer"] == 3


def test_top_k_larger_than_store_and_empty_store(tiny_pipe, ingested):
    with pytest.raises(QueryError, match="holds only 3 chunks"):
        ingested.query(Q, top_k=4)


def test_empty_store_without_documents(tiny_pipe):
    with pytest.raises(QueryError, match="holds no chunks"):
        tiny_pipe.query(Q)


def test_missing_store_for_readonly_info(tmp_path):
    from chunkcache.storedir import ChunkStore

    with pytest.raises(StoreError, match="chunkcache ingest"):
        ChunkStore(tmp_path / "absent", readonly=True)


def test_namespaces_do_not_share_hits(tiny_pipe):
    tiny_pipe.query(Q, documents=DOCS, namespace="tenant-a", max_new_tokens=1)
    other = tiny_pipe.query(Q, documents=DOCS, namespace="tenant-b", max_new_tokens=1)
    assert other.stats.chunk_misses == 3
    same = tiny_pipe.query(Q, documents=DOCS, namespace="tenant-a", max_new_tokens=1)
    assert same.stats.chunk_hits == 3


def test_all_modes_answer_and_report_recompute(tiny_pipe):
    seen = {}
    for mode in ("full", "reuse", "epic", "blend"):
        a = tiny_pipe.query(Q, documents=DOCS, mode=mode, max_new_tokens=2)
        seen[mode] = a.stats.recompute_fraction
        assert a.stats.prompt_tokens == tiny_pipe.query(Q, documents=DOCS, mode="full", max_new_tokens=1).stats.prompt_tokens
    assert seen["full"] == 1.0 and seen["reuse"] == 0.0 and 0 < seen["blend"] < 0.3


def test_query_selection_schemes_run(tiny_pipe):
    for selection in ("query", "hybrid", "impact"):
        a = tiny_pipe.query(Q, documents=DOCS, selection=selection, recompute_ratio=0.3, max_new_tokens=1)
        assert 0.2 < a.stats.recompute_fraction < 0.4


@pytest.mark.slow
def test_end_to_end_with_default_models(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "rivers.txt").write_text(
        "The Nile is the longest river in Africa. It flows north through Egypt into the Mediterranean Sea.\n\n"
        "The Danube flows through Vienna, Budapest and Belgrade before reaching the Black Sea.")
    (root / "cities.md").write_text("Canberra is the capital city of Australia. It was purpose-built as the capital.")
    pipe = RAGPipeline.open(tmp_path / "store", threads=2)
    report = pipe.ingest([root], progress=False)
    assert report.chunks_computed == report.chunks >= 2
    full = pipe.query("What is the capital of Australia?", top_k=2, mode="full", max_new_tokens=12)
    blend = pipe.query("What is the capital of Australia?", top_k=2, mode="blend", max_new_tokens=12)
    assert "Canberra" in blend.sources[0].text
    assert "Canberra" in full.text and "Canberra" in blend.text
    assert blend.stats.chunk_hits == 2 and blend.stats.cached_tokens > 0
    pipe.close()
    assert torch.get_num_threads() == 2
    reopened = RAGPipeline.open(tmp_path / "store")
    assert reopened.rt.lm.fingerprint == pipe.rt.lm.fingerprint
    reopened.close()


def test_a_cancelled_request_stops_between_decode_steps(tiny_pipe):
    from chunkcache.pipeline import RequestCancelled

    with pytest.raises(RequestCancelled):
        tiny_pipe.query(Q, documents=DOCS, max_new_tokens=20, cancelled=lambda: True)
    polls = iter([False] * 8 + [True] * 100)  # polled while queued and admitted, then at every decode step
    answer = tiny_pipe.query(Q, documents=DOCS, max_new_tokens=20, temperature=1.0, seed=0,
                             cancelled=lambda: next(polls))
    assert answer.finish_reason == "cancelled" and 0 < answer.stats.completion_tokens < 20
    assert tiny_pipe.engine.counts().running == 0  # its slot and memory are free again
    assert tiny_pipe.engine.counts().kv_bytes == 0
