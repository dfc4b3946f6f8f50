"""Damage is a miss, not an outage; the index heals; other processes' chunks and retired sources are seen
without a restart; verify --repair, gc and the store size cap."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from chunkcache import RAGPipeline
from chunkcache.cli import main
from chunkcache.repair import repair_store, verify_store
from store import CorruptEntryError

from .conftest import DOCS
from .test_store_faults import tiny_disk  # noqa: F401 - a fixture

Q = "Where is Mount Everest?"
ALL = dict(top_k=3, mode="reuse", max_new_tokens=6)


def open_pipe(path, lm, embedder, **kw):
    # Plain entries only: these tests count entries and ids; context-enriched ones have theirs in test_context.py.
    return RAGPipeline.open(path, lm=lm, embedder=embedder, kv_dtype="float32", chunk_tokens=48, max_new_tokens=8,
                            **({"chunk_context": "none"} | kw))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i, d in enumerate(DOCS):
        (root / f"{i}.txt").write_text(d)
    return root


@pytest.fixture
def ingested(tmp_path, corpus, tiny_lm, hash_embedder):
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    pipe.ingest([corpus], progress=False)
    yield pipe
    pipe.close()


def flip(pipe, db: str, key: bytes, offset: int = -1) -> None:
    """XOR one byte of a stored value through the pipeline's own environment (one env per process)."""
    kv = pipe.rt.store.kv

    def write(txn):
        value = bytearray(txn.get(key, db=kv._dbs[db]))
        value[offset] ^= 0x5A
        txn.put(key, bytes(value), db=kv._dbs[db])

    kv._write(write)


def key_of(pipe, word: str) -> bytes:
    ids, _ = pipe.rt.store.kv.embeddings()
    for key in pipe.rt.store.kv.key_for_id(ids):
        if word in pipe.rt.store.kv.get_meta(key)["text"]:
            return key
    raise AssertionError(word)


def test_damaged_kv_is_a_miss_recomputed_and_rewritten(ingested, caplog):
    clean = ingested.query(Q, **ALL)
    key = key_of(ingested, "Everest")
    flip(ingested, "kv", key)
    with caplog.at_level(logging.WARNING):
        damaged = ingested.query(Q, **ALL)
    assert damaged.stats.damaged_chunks == 1 and damaged.stats.chunk_misses == 1
    assert damaged.token_ids == clean.token_ids  # recomputed exactly as ingest computed it
    assert "checksum mismatch" in caplog.text and key.hex()[:16] in caplog.text
    assert ingested.rt.store.kv.damage["kv"] == 1
    with ingested.rt.store.kv.reader() as r:
        r.kv(key)  # rewritten: passes its checksum again
    again = ingested.query(Q, **ALL)
    assert again.stats.damaged_chunks == 0 and again.stats.chunk_hits == 3 and again.token_ids == clean.token_ids


def test_damaged_prefix_kv_is_recomputed_too(ingested):
    clean = ingested.query(Q, **ALL)
    flip(ingested, "kv", ingested.rt.prefix_key())
    answer = ingested.query(Q, **ALL)
    assert answer.stats.damaged_chunks == 1 and answer.token_ids == clean.token_ids
    assert ingested.query(Q, **ALL).stats.damaged_chunks == 0


def test_damaged_metadata_drops_the_chunk_from_the_answer_not_the_request(ingested, caplog):
    flip(ingested, "meta", key_of(ingested, "Everest"))
    with caplog.at_level(logging.WARNING):
        answer = ingested.query(Q, **ALL)
    assert len(answer.sources) == 2 and "metadata of chunk" in caplog.text


@pytest.mark.parametrize("damage", ["index", "sidecar", "stale"])
def test_damaged_or_inconsistent_index_is_rebuilt(tmp_path, corpus, tiny_lm, hash_embedder, damage, caplog):
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    pipe.ingest([corpus], progress=False)
    expected = pipe.query(Q, **ALL).sources
    pipe.close()
    index = tmp_path / "store" / "index.faiss"
    if damage == "index":
        raw = bytearray(index.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        index.write_bytes(bytes(raw))
    elif damage == "sidecar":
        sidecar = index.with_name("index.faiss.json")
        sidecar.write_text(sidecar.read_text().replace('"ntotal": 3', '"ntotal": 2'))
    else:
        sidecar = index.with_name("index.faiss.json")
        text = sidecar.read_text()
        assert '"watermark": [4, 0]' in text  # the prefix (id 0) and 3 chunks
        sidecar.write_text(text.replace('"watermark": [4, 0]', '"watermark": [9, 0]'))
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    with caplog.at_level(logging.WARNING):
        got = pipe.query(Q, **ALL).sources
    assert "rebuilding" in caplog.text
    assert [s.key for s in got] == [s.key for s in expected]
    pipe.close()
    assert not list((tmp_path / "store").glob("*.tmp"))


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from store import KVStore
    from retriever.hashing import HashingEmbedder
    store_dir, text, delete_hex = sys.argv[1], sys.argv[2], sys.argv[3]
    with KVStore(store_dir) as kv:
        if delete_hex:
            kv.delete_chunks([bytes.fromhex(delete_hex)])
        else:
            key = bytes(range(32))
            emb = HashingEmbedder().encode([text])[0]
            kv.put_chunks([(key, torch.zeros(2, 4, 2, 3, 16), {"source": "other.txt", "text": text,
                            "token_ids": [1, 2, 3], "num_tokens": 3}, emb)])
""")


def other_process(store_dir, text="", delete: bytes = b""):
    done = subprocess.run([sys.executable, "-c", WRITER, str(store_dir), text, delete.hex()], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_chunks_added_or_retired_by_another_process_are_seen_without_restart(ingested):
    store_dir = ingested.rt.store_path
    assert ingested.query(Q, **ALL).stats.chunk_hits == 3
    other_process(store_dir, text="Zanzibar spice islands archipelago")
    answer = ingested.query("Zanzibar spice islands archipelago", top_k=1, mode="reuse", max_new_tokens=2)
    assert answer.sources[0].source == "other.txt" and answer.stats.chunk_hits == 1
    assert ingested.rt.store.index().ntotal == 4
    everest = key_of(ingested, "Everest")
    other_process(store_dir, delete=everest)
    answer = ingested.query(Q, top_k=3, mode="reuse", max_new_tokens=2)
    assert everest.hex() not in [s.key for s in answer.sources] and ingested.rt.store.index().ntotal == 3


def test_reingesting_an_edited_or_removed_source_retires_its_old_chunks(ingested, corpus):
    everest = key_of(ingested, "Everest")
    (corpus / "1.txt").write_text("K2 is the second highest mountain, in the Karakoram range.")
    report = ingested.ingest([corpus], progress=False)
    assert report.chunks_retired == 1 and "1 retired" in report.summary()
    assert ingested.rt.store.kv.get_meta(everest) is None
    texts = [s.text for s in ingested.query("Everest Himalayas Nepal mountain", top_k=3, mode="reuse",
                                            max_new_tokens=2).sources]
    assert not any("Everest" in t for t in texts) and any("K2" in t for t in texts)
    (corpus / "2.txt").unlink()
    report = ingested.ingest([corpus], progress=False)
    assert report.chunks_retired == 1
    assert str((corpus / "2.txt").resolve()) not in ingested.rt.store.kv.sources()
    assert ingested.rt.store.index().ntotal == 2 == ingested.rt.store.kv.num_embeddings()


def test_a_chunk_shared_by_two_sources_stays_while_one_holds_it(ingested, corpus):
    (corpus / "copy.txt").write_text(DOCS[0])
    ingested.ingest([corpus], progress=False)
    amazon = key_of(ingested, "Amazon")
    (corpus / "0.txt").write_text("Something else entirely about rivers in general.")
    assert ingested.ingest([corpus], progress=False).chunks_retired == 0
    assert ingested.rt.store.kv.get_meta(amazon) is not None


def test_verify_finds_and_repair_fixes_every_kind_of_damage(ingested, corpus, caplog):
    clean = ingested.query(Q, **ALL)
    rt = ingested.rt
    flip(ingested, "kv", key_of(ingested, "Everest"))
    flip(ingested, "emb", key_of(ingested, "Amazon"))
    eiffel = key_of(ingested, "Eiffel")
    flip(ingested, "meta", eiffel)
    report, _ = verify_store(rt.store)
    assert report.damaged == {"kv": 1, "meta": 1, "emb": 1} and not report.clean
    report = repair_store(rt)
    assert report.repaired == {"kv": 1, "emb": 1, "meta (chunks deleted)": 1}
    assert report.sources_to_reingest == [str((corpus / "2.txt").resolve())] and "re-run" in report.summary()
    after, _ = verify_store(rt.store)
    assert after.clean and after.num_chunks == 3  # 2 chunks + the prompt prefix
    ingested.ingest([corpus], progress=False)  # restores the chunk whose metadata was lost
    answer = ingested.query(Q, **ALL)
    assert answer.stats.chunk_hits == 3 and answer.token_ids == clean.token_ids


def test_cli_verify_and_gc(ingested, capsys):
    store_dir = str(ingested.rt.store_path)
    flip(ingested, "kv", key_of(ingested, "Everest"))
    ingested.close()
    assert main(["verify", "--store", store_dir]) == 1
    assert "damaged: kv 1, meta 0, emb 0" in capsys.readouterr().out
    assert main(["gc", "--store", store_dir, "--to", "0", "--set-cap"]) == 0
    out = capsys.readouterr().out
    assert "evicted 3 entries" in out and "max_store_bytes recorded" in out
    assert main(["verify", "--store", store_dir]) == 0  # the damaged entry was evicted: nothing left to check


def test_store_cap_keeps_request_documents_bounded(tmp_path, tiny_lm, hash_embedder):
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    pipe.query(Q, documents=DOCS[:1], max_new_tokens=1)
    one = pipe.rt.store.kv.kv_bytes()  # the prefix and one document
    pipe.close()
    cap = 2 * one
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder, max_store_bytes=cap)
    for i in range(12):
        answer = pipe.query(Q, documents=[f"Passage number {i} about topic {i * 7}.", DOCS[i % 3]],
                            max_new_tokens=1)
        assert answer.stats.chunk_hits + answer.stats.chunk_misses == 2
        assert pipe.rt.store.kv.kv_bytes() <= cap
    pipe.close()
    reopened = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    assert reopened.rt.store.kv.max_kv_bytes is None  # the manifest was written without a cap
    reopened.close()


def test_cap_in_the_manifest_applies_on_reopen(tmp_path, tiny_lm, hash_embedder):
    open_pipe(tmp_path / "store", tiny_lm, hash_embedder, max_store_bytes=10**6).close()
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder)
    assert pipe.rt.store.kv.max_kv_bytes == 10**6 and pipe.config.max_store_bytes == 10**6
    pipe.close()
    pipe = open_pipe(tmp_path / "store", tiny_lm, hash_embedder, max_store_bytes=5)
    assert pipe.rt.store.kv.max_kv_bytes == 5
    pipe.close()
    with pytest.raises(ValueError, match="max_store_bytes must be an integer >= 0"):
        open_pipe(tmp_path / "other", tiny_lm, hash_embedder, max_store_bytes=-1)


def test_recomputed_entries_survive_a_failed_rewrite(ingested, monkeypatch):
    from store import DiskFullError

    clean = ingested.query(Q, **ALL)
    flip(ingested, "kv", key_of(ingested, "Everest"))

    def full(*_a, **_k):
        raise DiskFullError("disk full: test")

    monkeypatch.setattr(ingested.rt.store.kv, "replace_kv", full)
    answer = ingested.query(Q, **ALL)
    assert answer.stats.damaged_chunks == 1 and answer.token_ids == clean.token_ids
    with pytest.raises(CorruptEntryError), ingested.rt.store.kv.reader() as r:
        r.kv(key_of(ingested, "Everest"))
    assert np.isfinite(answer.ttft_s)


def test_disk_full_during_ingest_says_so_leaves_no_temp_files_and_reads_keep_working(tiny_disk, tmp_path, tiny_lm,
                                                                                      hash_embedder):
    from store import DiskFullError

    corpus = tmp_path / "big"
    corpus.mkdir()
    for i in range(12):  # ~100 chunks of 48 float32 tokens: ~5 MB of KV for a 2 MiB disk
        (corpus / f"{i}.txt").write_text(" ".join(f"Fact {i}.{s} says the value {s * 13} holds." for s in range(60)))
    pipe = open_pipe(tiny_disk / "store", tiny_lm, hash_embedder)
    with pytest.raises(DiskFullError, match="disk full"):
        pipe.ingest([corpus], progress=False)
    assert not [p.name for p in (tiny_disk / "store").iterdir() if p.name.endswith(".tmp")]
    stored = pipe.rt.store.kv.num_embeddings()
    assert stored > 0
    answer = pipe.query("Fact 0.1 value", top_k=1, mode="reuse", max_new_tokens=2)
    assert answer.stats.chunk_hits == 1
    pipe.close()
