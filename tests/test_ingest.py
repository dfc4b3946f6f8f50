"""Ingest: chunking, incremental and resumable ingest, store/model mismatches, bad input."""
from __future__ import annotations

import json

import pytest

from chunkcache import RAGPipeline
from chunkcache import ingest as ingest_module
from chunkcache.chunker import split_chunks
from chunkcache.corpus import CorpusError
from chunkcache.storedir import StoreMismatchError

from .conftest import DOCS, make_tiny_lm

LONG_TEXT = "\n\n".join(
    " ".join(f"Sentence {p}.{s} talks about topic {p} with some detail and a number {s * 7}." for s in range(12))
    for p in range(6))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(LONG_TEXT)
    (root / "b.md").write_text("# Title\n\n" + DOCS[0] + "\n\n" + DOCS[1])
    (root / "sub" / "c.jsonl").write_text(
        json.dumps({"title": "Tower", "text": DOCS[2]}) + "\n" + json.dumps({"text": "Second line document."}) + "\n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (root / "binary.txt").write_bytes(b"abc\x00def")
    return root


def open_pipe(path, lm, embedder, **kw):
    return RAGPipeline.open(path, lm=lm, embedder=embedder, kv_dtype="float32", chunk_tokens=48, **kw)


def test_chunker_respects_size_and_boundaries(tokenizer):
    chunks = split_chunks(LONG_TEXT, tokenizer, 48)
    assert len(chunks) > 6
    for c in chunks:
        assert len(tokenizer.encode(c.text, add_special_tokens=False)) <= 48 + 2
        assert LONG_TEXT[c.start:c.end] == c.text
        assert c.text.endswith(".")  # broke at a sentence end, never mid-sentence here
    # every character of content is covered, in order
    assert "".join(c.text for c in chunks).replace(" ", "") == LONG_TEXT.replace(" ", "").replace("\n", "")


def test_chunker_splits_a_sentence_longer_than_a_chunk(tokenizer):
    text = " ".join(["word"] * 300)
    chunks = split_chunks(text, tokenizer, 64)
    assert len(chunks) >= 4
    assert all(len(tokenizer.encode(c.text, add_special_tokens=False)) <= 66 for c in chunks)


def test_ingest_counts_skips_and_reingest_computes_nothing(tmp_path, corpus, tiny_lm, hash_embedder):
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    first = pipe.ingest([corpus], progress=False)
    assert first.files == 3 and first.documents == 4
    assert set(first.skipped) == {str((corpus / "binary.txt").resolve())}
    assert set(first.ignored) == {str(corpus / "image.png")}
    assert first.chunks_computed == first.chunks > 6 and first.tokens_computed > 0
    assert pipe.rt.store.index().ntotal == first.chunks

    again = pipe.ingest([corpus], progress=False)
    assert again.chunks_computed == 0 and again.tokens_computed == 0 and again.files_unchanged == 3

    (corpus / "d.txt").write_text("A brand new file about the Nile river in Egypt.")
    more = pipe.ingest([corpus], progress=False)
    assert more.chunks_computed == 1 and more.files_unchanged == 3
    assert pipe.rt.store.index().ntotal == first.chunks + 1
    pipe.close()


def test_identical_chunks_are_stored_once(tmp_path, tiny_lm, hash_embedder):
    root = tmp_path / "dup"
    root.mkdir()
    (root / "one.txt").write_text(DOCS[0])
    (root / "two.txt").write_text(DOCS[0])
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    report = pipe.ingest([root], progress=False)
    assert report.chunks == 2 and report.chunks_computed == 1 and report.chunks_reused == 1
    assert pipe.rt.store.index().ntotal == 1
    pipe.close()


def test_interrupted_ingest_leaves_usable_store_and_resumes(tmp_path, corpus, tiny_lm, hash_embedder, monkeypatch):
    reference = open_pipe(tmp_path / "ref", tiny_lm, hash_embedder)
    expected = reference.ingest([corpus], progress=False).chunks
    reference.close()

    monkeypatch.setattr(ingest_module, "WRITE_BATCH", 2)
    real_chunk_kv = ingest_module.chunk_kv
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_chunk_kv(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "chunk_kv", flaky)
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    with pytest.raises(KeyboardInterrupt):
        pipe.ingest([corpus], progress=False)
    stored = len(pipe.rt.store.kv) - 1  # minus the prefix entry
    assert stored == 4  # two whole batches of 2 landed; the third was never committed
    pipe.close()

    # A fresh process opens the interrupted store, answers from it, and a re-run finishes the job.
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    assert pipe.rt.store.index().ntotal == 4
    assert pipe.query("topic 1", top_k=2, max_new_tokens=2).stats.chunk_hits == 2
    report = pipe.ingest([corpus], progress=False)
    assert report.chunks == expected
    assert report.chunks_computed == expected - 4
    assert pipe.rt.store.index().ntotal == expected
    pipe.close()


def test_missing_path_is_an_error_and_writes_nothing(tmp_path, tiny_lm, hash_embedder):
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    with pytest.raises(CorpusError, match="no such file"):
        pipe.ingest([tmp_path / "nope.txt"], progress=False)
    assert len(pipe.rt.store.kv) == 0
    pipe.close()


def test_empty_corpus_is_an_error(tmp_path, tiny_lm, hash_embedder):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "blob.bin").write_bytes(b"\x00\x01")
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    with pytest.raises(CorpusError, match="no documents found"):
        pipe.ingest([root], progress=False)
    pipe.close()


def test_store_built_by_another_model_is_refused(tmp_path, tokenizer, tiny_lm, hash_embedder):
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    pipe.query("Where?", documents=DOCS[:1], max_new_tokens=1)
    pipe.close()
    other = make_tiny_lm(tokenizer, seed=1)
    with pytest.raises(StoreMismatchError, match="different model"):
        open_pipe(tmp_path / "store", other, hash_embedder)


def test_store_settings_cannot_be_overridden(tmp_path, tiny_lm, hash_embedder):
    open_pipe(tmp_path / "store", tiny_lm, hash_embedder).close()
    with pytest.raises(ValueError, match="cannot be overridden"):
        RAGPipeline.open(tmp_path / "store", lm=tiny_lm, embedder=hash_embedder, kv_dtype="float16")
    reopened = RAGPipeline.open(tmp_path / "store", lm=tiny_lm, embedder=hash_embedder)
    assert reopened.config.kv_dtype == "float32" and reopened.config.chunk_tokens == 48
    reopened.close()


def test_keys_depend_on_namespace_and_prefix(tmp_path, tiny_lm, hash_embedder):
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    ids = [1, 2, 3]
    assert pipe.rt.key_for(ids) != pipe.rt.key_for(ids, namespace="tenant-a")
    assert pipe.rt.key_for(ids) == pipe.rt.key_for(list(ids))
    pipe.close()
    other_prompt = open_pipe(tmp_path / "store2", tiny_lm, hash_embedder, system_prompt="Be brief.")
    assert other_prompt.rt.key_for(ids) != pipe.rt.key_for(ids)
    other_prompt.close()
