"""Distributed ingest on a real local Ray cluster, writing to a real Redis: the same store as a local
ingest, resumable, and whole after a worker is killed mid-run. Slow: Ray and the workers' models start."""
import os
import signal

import numpy as np
import pytest
import torch

from chunkcache import RAGPipeline
from chunkcache.distributed import RayOptions, compute_on_ray
from chunkcache.ingest import IngestReport, document_chunks, text_document

pytestmark = pytest.mark.slow

TEXTS = [{"text": f"Station {i} records {i * 3} millimetres of rain in spring. Its keeper is called Ana {i}.",
          "source": f"station-{i}"} for i in range(24)]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def open_pipe(store, tiny_model_dir):
    return RAGPipeline.open(store, model=tiny_model_dir, kv_dtype="float32", chunk_tokens=48, threads=1)


def stored(pipe):
    """key -> (id, KV, embedding) of every chunk in the store."""
    kv = pipe.rt.store.kv
    ids, vecs = kv.embeddings()
    keys = kv.key_for_id(ids)
    with kv.reader() as r:
        return {k: (int(i), r.kv(k).clone(), v) for k, i, v in zip(keys, ids, vecs)}


def test_ray_ingest_stores_what_a_local_ingest_stores(ray_cluster, tiny_model_dir, redis_server, tmp_path):
    local = open_pipe(tmp_path / "local", tiny_model_dir)
    local.ingest_texts(TEXTS, progress=False)
    pipe = open_pipe(redis_server.url + "?prefix=ray-same", tiny_model_dir)
    report = pipe.ingest_texts(TEXTS, progress=False, ray=RayOptions(workers=2, threads=1, batch=4))
    assert report.chunks_computed == len(TEXTS) and report.workers == 2 and report.chunks_reused == 0
    ours, theirs = stored(pipe), stored(local)
    assert ours.keys() == theirs.keys()
    assert sorted(i for i, *_ in ours.values()) == list(range(1, len(TEXTS) + 1))  # 0 is the prompt prefix
    for key, (_, kv, emb) in ours.items():
        torch.testing.assert_close(kv, theirs[key][1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(emb, theirs[key][2], rtol=1e-5, atol=1e-6)
    assert all(r["complete"] for r in pipe.rt.store.kv.sources().values())
    # The driver's index holds the workers' chunks: retrieval answers as the local store's does.
    question = "How much rain does station 7 record?"
    assert [s.key for s in pipe.retrieve(question)] == [s.key for s in local.retrieve(question)]
    # Resumable: a second run computes nothing; a new text alone is computed.
    again = pipe.ingest_texts(TEXTS + [{"text": "Station 99 is new.", "source": "station-99"}], progress=False,
                              ray=RayOptions(workers=2, threads=1))
    assert (again.files_unchanged, again.chunks_computed) == (len(TEXTS), 1)
    local.close()
    pipe.close()


def test_a_worker_killed_mid_ingest_loses_and_duplicates_nothing(ray_cluster, tiny_model_dir, redis_server):
    pipe = open_pipe(redis_server.url + "?prefix=ray-kill", tiny_model_dir)
    chunks = [c for n, item in enumerate(TEXTS) for c in document_chunks(pipe.rt, text_document(item, n))]
    report, killed = IngestReport(), []

    def kill_the_first_worker(done):
        if not killed:
            killed.append(done["pid"])
            os.kill(done["pid"], signal.SIGKILL)

    compute_on_ray(pipe.rt, chunks, RayOptions(workers=2, threads=1, batch=1), report,
                   on_batch=kill_the_first_worker)
    kv = pipe.rt.store.kv
    assert killed and report.workers >= 3  # the killed actor was restarted as a new process
    assert kv.missing([c.key for c in chunks]) == []
    assert kv.watermark() == (len(chunks), 0) and kv.client.hlen(kv._ids) == len(chunks)  # one id per chunk
    assert kv.num_embeddings() == len(chunks)
    pipe.close()


def test_ray_options_reach_the_cli(redis_server, tiny_model_dir, tmp_path, ray_cluster, capsys):
    from chunkcache.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for item in TEXTS[:6]:
        (corpus / f"{item['source']}.txt").write_text(item["text"])
    store = redis_server.url + "?prefix=ray-cli"
    assert main(["ingest", str(corpus), "--store", store, "--model", tiny_model_dir, "--chunk-tokens", "48",
                 "--ray", "--ray-workers", "2", "--ray-threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "6 computed" in out and "Ray worker process" in out
