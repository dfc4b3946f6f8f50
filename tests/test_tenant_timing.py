"""What one tenant can observe of another through the cache (docs/SECURITY.md), measured over HTTP.

Tenant B probes chunks and reads what any caller sees: each source's `hit` flag and the request's KV
load time. A hit is a read, a miss a compute and a write, so the time alone tells them apart (the
positive control below shows the probe is sharp enough). Then: texts tenant A sent are misses for B,
timed like texts nobody sent; the store's ingested chunks are hits for every tenant whoever used them.
"""
from __future__ import annotations

import statistics

import pytest
from fastapi.testclient import TestClient

from chunkcache.server import ServerSettings, create_app

from .test_server import open_store_pipeline

KEYS = {"key-a": "team-a", "key-b": "team-b"}
ROUNDS = 5


def passage(tag: str, i: int) -> str:
    # ~175 tokens, so a miss (compute + LMDB commit) costs clearly more than a hit (a read).
    return f"Passage {tag}-{i}. " + " ".join(f"The {tag} river number {i} passes town {j} on its way."
                                            for j in range(12))


def probe(client, key: str, **payload) -> tuple[list[bool], float]:
    r = client.post("/query", headers={"Authorization": f"Bearer {key}"},
                    json={"question": "Which town does the river pass?", "max_new_tokens": 1, "mode": "reuse",
                          **payload})
    assert r.status_code == 200, r.text
    body = r.json()
    return [s["hit"] for s in body["sources"]], body["timings"]["load_s"]


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, tiny_lm, hash_embedder):
    pipe = open_store_pipeline(tmp_path_factory.mktemp("timing"), tiny_lm, hash_embedder)
    with TestClient(create_app(pipe, ServerSettings(api_keys=KEYS))) as client:
        yield client, pipe
    pipe.close()


def test_another_tenants_documents_are_never_hits_and_look_unused(tenants):
    client, _ = tenants
    times = {"used by A": [], "never sent": [], "sent by B (control)": []}
    for i in range(ROUNDS):
        probe(client, "key-a", documents=[passage("alpha", i)])  # A's activity: a miss, then a hit for A
        assert probe(client, "key-a", documents=[passage("alpha", i)])[0] == [True]
        probe(client, "key-b", documents=[passage("beta", i)])
        for name, text in (("used by A", passage("alpha", i)), ("never sent", passage("gamma", i)),
                           ("sent by B (control)", passage("beta", i))):
            hits, load_s = probe(client, "key-b", documents=[text])
            assert hits == [name == "sent by B (control)"], (name, hits)
            times[name].append(load_s)
    median = {name: statistics.median(t) for name, t in times.items()}
    print("\ntenant B's KV load time, median of", ROUNDS, {k: f"{v * 1e3:.2f} ms" for k, v in median.items()})
    # The probe sees hits: B's own texts load faster than texts nobody sent.
    assert median["sent by B (control)"] < median["never sent"]
    # A's texts look like texts nobody sent: nearer that median than the hits' median.
    threshold = (median["sent by B (control)"] + median["never sent"]) / 2
    assert median["used by A"] > threshold, median


def test_store_chunks_are_hits_for_everyone_whoever_used_them(tenants):
    client, pipe = tenants
    entries = len(pipe.rt.store.kv)
    # A retrieves the corpus first; B then sees exactly what it saw before A did anything: hits.
    for key in ("key-b", "key-a", "key-b"):
        hits, _ = probe(client, key, top_k=3)
        assert hits == [True, True, True]
    assert len(pipe.rt.store.kv) == entries  # no per-tenant copies
