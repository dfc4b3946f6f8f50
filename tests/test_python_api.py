"""The Python API's habits: a context manager, raw texts with metadata, dict documents, a pluggable
chunker, and one store opened twice in a process."""
from __future__ import annotations

import pytest

from .conftest import DOCS, open_tiny_pipe


def test_a_pipeline_is_a_context_manager(tmp_path, tiny_lm, hash_embedder):
    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder) as pipe:
        assert pipe.query("Where is Everest?", documents=DOCS, max_new_tokens=1).token_ids
    with pytest.raises(Exception):
        pipe.rt.store.kv.manifest  # closed


def test_ingest_texts_with_metadata_then_retrieve_them(tiny_pipe):
    report = tiny_pipe.ingest_texts([
        {"text": DOCS[0], "source": "wiki/amazon", "title": "Amazon"},
        {"text": DOCS[1], "source": "wiki/everest"},
        DOCS[2],
    ], progress=False)
    assert report.chunks == 3 and report.chunks_computed == 3
    sources = tiny_pipe.retrieve("Amazon river Brazil water", top_k=3)
    names = {s.source for s in sources}
    assert {"wiki/amazon", "wiki/everest"} < names and any(n.startswith("text:") for n in names)  # content hash
    amazon = next(s for s in sources if s.source == "wiki/amazon")
    assert amazon.text.startswith("Amazon\n") and amazon.hit
    again = tiny_pipe.ingest_texts([{"text": DOCS[0], "source": "wiki/amazon", "title": "Amazon"}], progress=False)
    assert again.files_unchanged == 1 and again.chunks_computed == 0
    changed = tiny_pipe.ingest_texts([{"text": "The Nile flows north.", "source": "wiki/amazon"}], progress=False)
    assert changed.chunks_retired == 1
    assert all(s.source != "wiki/amazon" or "Nile" in s.text for s in tiny_pipe.retrieve("river", top_k=3))
    with pytest.raises(ValueError, match="text 0 must be"):
        tiny_pipe.ingest_texts([{"body": "x"}])


def test_a_pluggable_chunker(tiny_pipe):
    by_sentence = lambda text: [s.strip() + "." for s in text.split(".") if s.strip()]  # noqa: E731
    report = tiny_pipe.ingest_texts([DOCS[0]], chunker=by_sentence, progress=False)
    assert report.chunks == 2
    texts = {s.text for s in tiny_pipe.retrieve("Amazon", top_k=2)}
    assert texts == {"The Amazon river flows through Brazil.", "It carries more water than any other river on Earth."}
    with pytest.raises(ValueError, match="list of strings"):
        tiny_pipe.ingest_texts(["x y"], chunker=lambda text: text)


def test_documents_may_carry_their_source(tiny_pipe):
    answer = tiny_pipe.query("Where is Everest?", max_new_tokens=1,
                             documents=[{"text": DOCS[1], "source": "atlas p.12"}, DOCS[0]])
    assert [s.source for s in answer.sources] == ["atlas p.12", "documents[1]"]


def test_the_same_store_opened_twice_shares_one_environment(tmp_path, tiny_lm, hash_embedder):
    first = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder)
    second = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder)
    try:
        assert first.rt.store.kv is second.rt.store.kv
        first.ingest_texts([DOCS[0]], progress=False)
        assert second.retrieve("Amazon", top_k=1)[0].text == DOCS[0]  # the other sees it at once
        first.close()
        assert second.query("Where is the Amazon?", max_new_tokens=1).sources  # still open for the second
    finally:
        first.close()
        second.close()
