"""The HTTP API through starlette's TestClient, on the tiny random model: every endpoint and every error."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from chunkcache import Answer, CacheStats, RAGPipeline, Source, Timings
from chunkcache.engine import Ticket
from chunkcache.server import Limits, Metrics, NoMetrics, ServerSettings, create_app, parse_api_keys

from store import DiskFullError

from .conftest import DOCS
from .test_store_faults import tiny_disk  # noqa: F401 - a fixture

# Documents only the tenancy tests use, so no other test has cached them.
TENANT_DOCS = [
    "The Danube flows through ten countries and ends in the Black Sea delta in Romania.",
    "Lake Baikal in Siberia holds about a fifth of the unfrozen fresh water on the planet.",
]


def open_store_pipeline(directory, tiny_lm, hash_embedder, *, ingest: bool = True, **overrides) -> RAGPipeline:
    """A tiny pipeline whose store holds DOCS (one file each: one chunk each)."""
    pipe = RAGPipeline.open(directory / "store", lm=tiny_lm, embedder=hash_embedder, kv_dtype="float32",
                            chunk_tokens=48, max_new_tokens=8, **overrides)
    if ingest:
        corpus = directory / "corpus"
        corpus.mkdir()
        for i, text in enumerate(DOCS):
            (corpus / f"doc{i}.txt").write_text(text)
        pipe.ingest([corpus], progress=False)
    return pipe


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) per Server-Sent Event."""
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        events.append((name, "\n".join(data)))
    return events


@pytest.fixture(scope="module")
def store_pipe(tmp_path_factory, tiny_lm, hash_embedder):
    pipe = open_store_pipeline(tmp_path_factory.mktemp("server"), tiny_lm, hash_embedder)
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def client(store_pipe):
    with TestClient(create_app(store_pipe)) as c:
        yield c


class FakePipeline:
    """Stands in for RAGPipeline where a test needs it to block or fail."""

    def __init__(self, *, error: Exception | None = None, gate: threading.Event | None = None,
                 fail_after_first: bool = False):
        self.error, self.gate, self.fail_after_first = error, gate, fail_after_first
        self.closed = False
        self.entered = threading.Event()

    def events(self, question, **kwargs):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.error is not None and not self.fail_after_first:
            raise self.error
        yield "partial"
        if self.error is not None:
            raise self.error
        yield fake_answer("partial")

    def submit(self, question, **kwargs):
        """As the engine does: a real Ticket, filled from another thread."""
        ticket = Ticket(SimpleNamespace(cancelled=None))

        def run():
            try:
                for event in self.events(question, **kwargs):
                    ticket.put(event)
            except Exception as exc:
                ticket.put(exc)

        threading.Thread(target=run, daemon=True).start()
        return ticket

    def query(self, question, **kwargs):
        return [e for e in self.events(question, **kwargs) if isinstance(e, Answer)][0]

    def close(self):
        self.closed = True


def fake_answer(text: str) -> Answer:
    return Answer(text, [1], [Source("doc", "documents[0]", None, "00", True)], 0.01, 0.02, Timings(),
                  CacheStats(mode="blend", prompt_tokens=10, cached_tokens=7, chunk_hits=1, completion_tokens=1),
                  "length")


# -- /healthz ----------------------------------------------------------------------------------------
def test_healthz_ready(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": "tiny-random-0"}


def test_healthz_503_until_the_factory_has_loaded():
    gate = threading.Event()

    built = []

    def factory():
        assert gate.wait(10)
        built.append(FakePipeline())
        return built[0]

    with TestClient(create_app(factory)) as c:
        assert c.get("/healthz").status_code == 503
        assert c.get("/healthz").json() == {"status": "loading"}
        r = c.post("/query", json={"question": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert r.headers["retry-after"] == "5"
        gate.set()
        deadline = time.monotonic() + 10
        while c.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the pipeline never became ready"
            time.sleep(0.02)
        assert c.post("/query", json={"question": "hi"}).json()["text"] == "partial"
    assert built[0].closed  # the app built it, so the app closes it at shutdown


def test_healthz_reports_a_failed_load(caplog):
    def factory():
        raise RuntimeError("no weights here")

    app = create_app(factory)
    stopped = threading.Event()
    app.state.on_load_failure = stopped.set
    with caplog.at_level(logging.ERROR, "chunkcache.server"), TestClient(app) as c:
        assert stopped.wait(10)
        assert c.get("/healthz").json() == {"status": "failed"}
        r = c.post("/query", json={"question": "hi"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
    assert "no weights here" in caplog.text


# -- /query --------------------------------------------------------------------------------------------
def test_query_matches_the_pipeline(client, store_pipe):
    r = client.post("/query", json={"question": "Where is Mount Everest?", "documents": DOCS, "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    direct = store_pipe.query("Where is Mount Everest?", documents=DOCS, max_new_tokens=6)
    assert body["text"] == direct.text and body["token_ids"] == direct.token_ids
    assert [s["text"] for s in body["sources"]] == [d.strip() for d in DOCS]
    assert all(s["hit"] for s in body["sources"]) and body["stats"]["chunk_hits"] == 3
    assert body["ttft_s"] > 0 and set(body["timings"]) == {"queue_s", "retrieve_s", "load_s", "prefill_s", "decode_s"}
    assert body["stats"]["prompt_tokens"] == direct.stats.prompt_tokens > 0
    assert body["stats"]["cached_tokens"] == direct.stats.cached_tokens > 0
    assert body["config"]["mode"] == "blend"


def test_query_chunk_scale_reaches_the_pipeline(client, store_pipe):
    payload = {"question": "Where is Mount Everest?", "documents": DOCS, "max_new_tokens": 4, "mode": "reuse"}
    scaled = client.post("/query", json={**payload, "chunk_scale": 0.3, "scale_queries": "question"}).json()
    direct = store_pipe.query("Where is Mount Everest?", documents=DOCS, max_new_tokens=4, mode="reuse",
                              chunk_scale=0.3, scale_queries="question")
    assert scaled["token_ids"] == direct.token_ids
    assert scaled["config"]["chunk_scale"] == 0.3 and scaled["config"]["scale_queries"] == "question"


def test_query_retrieves_from_the_store(client):
    r = client.post("/query", json={"question": "Eiffel Tower Paris", "top_k": 2, "mode": "full"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["sources"]) == 2 and body["stats"]["mode"] == "full"
    assert "Eiffel" in body["sources"][0]["text"] and body["sources"][0]["score"] is not None


def test_query_logprobs_and_sampling(client):
    r = client.post("/query", json={"question": "Where is the Amazon?", "documents": DOCS[:1], "logprobs": 3,
                                    "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["logprobs"]) >= len(body["token_ids"]) and len(body["logprobs"][0]["top_logprobs"]) == 3
    again = client.post("/query", json={"question": "Where is the Amazon?", "documents": DOCS[:1], "logprobs": 3,
                                        "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 4}).json()
    assert again["token_ids"] == body["token_ids"]


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"temperature": 0.5, "top_p": 1e-320}])
def test_vanishing_temperature_or_top_p_decodes_greedily(client, sampling):
    # Found by the fuzzer: passed on as is, these made torch.multinomial fail (a 500).
    payload = {"question": "Where is Everest?", "documents": DOCS[:1], "max_new_tokens": 3}
    r = client.post("/query", json={**payload, **sampling})
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == client.post("/query", json=payload).json()["token_ids"]


def test_query_stream(client):
    payload = {"question": "Where does the Amazon flow?", "documents": DOCS, "stream": True, "max_new_tokens": 6}
    with client.stream("POST", "/query", json=payload) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    names = [name for name, _ in events]
    assert names[-1] == "answer" and set(names[:-1]) <= {"token"} and len(names) >= 2
    pieces = "".join(json.loads(data)["text"] for name, data in events[:-1])
    final = json.loads(events[-1][1])
    assert pieces.strip() == final["text"] and final["stats"]["chunk_hits"] + final["stats"]["chunk_misses"] == 3
    assert final["ttft_s"] > 0
    plain = client.post("/query", json={**payload, "stream": False}).json()
    assert plain["token_ids"] == final["token_ids"]


@pytest.mark.parametrize("payload, field", [
    ({}, "question"),
    ({"question": ""}, "question"),
    ({"question": "x" * 100_001}, "question"),
    ({"question": "q", "max_new_tokens": 0}, "max_new_tokens"),
    ({"question": "q", "max_new_tokens": 2049}, "max_new_tokens"),
    ({"question": "q", "top_k": -1}, "top_k"),
    ({"question": "q", "top_k": 33}, "top_k"),
    ({"question": "q", "documents": []}, "documents"),
    ({"question": "q", "documents": ["d"] * 65}, "documents"),
    ({"question": "q", "documents": ["x" * 20_001]}, "documents.0"),
    ({"question": "q", "documents": [""]}, "documents.0"),
    ({"question": "q", "temperature": -0.1}, "temperature"),
    ({"question": "q", "temperature": 2.5}, "temperature"),
    ({"question": "q", "top_p": 0}, "top_p"),
    ({"question": "q", "top_p": 1.5}, "top_p"),
    ({"question": "q", "logprobs": 21}, "logprobs"),
    ({"question": "q", "recompute_ratio": 1.5}, "recompute_ratio"),
    ({"question": "q", "mode": "turbo"}, "mode"),
    ({"question": "q", "seed": -1}, "seed"),
    ({"question": "q", "deviation": "both"}, "deviation"),
    ({"question": "q", "chunk_scale": 0}, "chunk_scale"),
    ({"question": "q", "chunk_scale": "strong"}, "chunk_scale"),
    ({"question": "q", "scale_queries": "some"}, "scale_queries"),
    ({"question": "q", "stream": "maybe"}, "stream"),
    ({"question": "q", "topk": 3}, "topk"),
    ({"question": 5}, "question"),
])
def test_query_validation_422(client, payload, field):
    r = client.post("/query", json=payload)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error" and error["param"] == field
    assert error["message"].startswith(f"{field}: ")


def test_query_malformed_json_422(client):
    r = client.post("/query", content=b'{"question": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    assert r.json()["error"]["message"].startswith("the body is not valid JSON: ")


@pytest.mark.parametrize("payload, message", [
    ({"question": "   "}, "the question is empty"),
    ({"question": "rivers", "top_k": 10}, "top_k=10 but the store holds only 3 chunks"),
    ({"question": "q", "documents": ["   "]}, "documents [0] are empty"),
    ({"question": "q", "check_layer": 1024}, "check_layer=1024 but the model has 4 layers"),
])
def test_query_error_422_with_the_pipeline_message(client, payload, message):
    r = client.post("/query", json=payload)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "query_error" and message in r.json()["error"]["message"]


def test_query_error_before_a_stream_is_an_http_error(client):
    r = client.post("/query", json={"question": "rivers", "top_k": 10, "stream": True})
    assert r.status_code == 422 and "store holds only" in r.json()["error"]["message"]


# -- unexpected errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_unexpected_error_is_a_generic_500(caplog, stream):
    app = create_app(FakePipeline(error=RuntimeError("secret stack detail")))
    with caplog.at_level(logging.ERROR, "chunkcache.server"), TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/query", json={"question": "hi", "stream": stream})
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "internal error; see the server log", "type": "server_error",
                                 "param": None, "code": "internal_error"}
    assert "secret" not in r.text and "Traceback" not in r.text
    assert "secret stack detail" in caplog.text  # logged with its traceback


def test_error_in_the_middle_of_a_stream_is_a_generic_error_event(caplog):
    app = create_app(FakePipeline(error=RuntimeError("secret"), fail_after_first=True))
    with caplog.at_level(logging.ERROR, "chunkcache.server"), TestClient(app) as c:
        with c.stream("POST", "/query", json={"question": "hi", "stream": True}) as r:
            events = sse_events(r.read().decode())
    assert r.status_code == 200
    assert events[0] == ("token", json.dumps({"text": "partial"}))
    assert events[-1][0] == "error" and json.loads(events[-1][1])["error"]["code"] == "internal_error"
    assert "secret" not in events[-1][1] and "secret" in caplog.text


@pytest.mark.parametrize("stream, fail_after_first", [(False, False), (True, False), (True, True)])
def test_a_full_disk_is_507_with_a_clear_message(caplog, stream, fail_after_first):
    full = DiskFullError("disk full: writing to the store at /srv/private/store failed (No space left on device)")
    app = create_app(FakePipeline(error=full, fail_after_first=fail_after_first))
    with caplog.at_level(logging.ERROR, "chunkcache.server"), TestClient(app) as c:
        r = c.post("/query", json={"question": "hi", "stream": stream})
    if fail_after_first:  # the 200 was already sent: the last event says it
        assert r.status_code == 200
        error = json.loads(sse_events(r.text)[-1][1])["error"]
    else:
        assert r.status_code == 507
        error = r.json()["error"]
    assert error["code"] == "disk_full" and error["type"] == "server_error"
    assert error["message"].startswith("the server's disk is full") and "cached chunks still work" in error["message"]
    assert "/srv/private" not in r.text and "/srv/private/store" in caplog.text  # paths go to the log only


def test_a_full_disk_fails_only_the_requests_that_must_write(tiny_disk, tiny_lm, hash_embedder):
    pipe = open_store_pipeline(tiny_disk, tiny_lm, hash_embedder)
    entries = len(pipe.rt.store.kv)
    filler = os.open(tiny_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(filler, b"\0" * 4096)
        os.close(filler)
        with TestClient(create_app(pipe)) as c:
            new = c.post("/query", json={"question": "Everest?", "max_new_tokens": 2,
                                         "documents": ["Fresh text the store has never held. " * 40]})
            stored = c.post("/query", json={"question": "Where is Mount Everest?", "top_k": 3, "max_new_tokens": 2})
            paths = c.get("/openapi.json").json()["paths"]
        assert "507" in paths["/query"]["post"]["responses"] and "507" not in paths["/v1/models"]["get"]["responses"]
        assert new.status_code == 507 and new.json()["error"]["code"] == "disk_full"
        assert stored.status_code == 200 and stored.json()["stats"]["chunk_hits"] == 3
        assert len(pipe.rt.store.kv) == entries
        assert not [p.name for p in (tiny_disk / "store").iterdir() if p.name.endswith(".tmp")]
    finally:
        pipe.close()


def test_unknown_route_404(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "http_404"


# -- limits --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_body_client(store_pipe):
    with TestClient(create_app(store_pipe, ServerSettings(limits=Limits(max_body_bytes=1000)))) as c:
        yield c


def test_413_on_content_length(small_body_client):
    r = small_body_client.post("/query", json={"question": "q", "documents": ["x" * 2000]})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and "limit is 1000 bytes" in r.json()["error"]["message"]


def test_413_on_a_streamed_body_without_content_length(small_body_client):
    def body():
        yield b'{"question": "q", "documents": ["'
        for _ in range(20):
            yield b"x" * 100
        yield b'"]}'

    r = small_body_client.post("/query", content=body(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413


def test_small_streamed_body_passes(small_body_client):
    r = small_body_client.post("/query", content=iter([b'{"question": ', b'"   "}']),
                               headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "query_error"


def test_busy_server_503():
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    app = create_app(pipe, ServerSettings(max_pending=1))
    with TestClient(app) as c:
        first = {}
        worker = threading.Thread(target=lambda: first.update(r=c.post("/query", json={"question": "a"})))
        worker.start()
        assert pipe.entered.wait(10)
        r = c.post("/query", json={"question": "b"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
        assert r.headers["retry-after"] == "1"
        gate.set()
        worker.join(10)
        assert first["r"].status_code == 200
        assert c.post("/query", json={"question": "c"}).status_code == 200


# -- auth and tenancy ----------------------------------------------------------------------------------
def test_parse_api_keys():
    assert parse_api_keys(" k1, k2:team-a ,,") == {"k1": None, "k2": "team-a"}
    with pytest.raises(ValueError, match="KEY:TENANT"):
        parse_api_keys("k3:")
    with pytest.raises(ValueError) as info:
        parse_api_keys(":tenant")
    assert "KEY" in str(info.value)


def test_settings_from_args_and_env():
    class Args:
        api_keys = ["k3:team-c"]

    settings = ServerSettings.from_args(Args(), {"CHUNKCACHE_API_KEYS": "k1,k2:team-b"})
    assert settings.api_keys == {"k1": None, "k2": "team-b", "k3": "team-c"} and settings.auth_enabled
    assert not ServerSettings.from_args(object(), {}).auth_enabled
    assert ServerSettings.from_args(Args(), {"CHUNKCACHE_ADMIN_KEY": "adm"}).admin_key == "adm"
    Args.admin_key = "flag-adm"
    assert ServerSettings.from_args(Args(), {"CHUNKCACHE_ADMIN_KEY": "adm"}).admin_key == "flag-adm"
    with pytest.raises(ValueError, match="admin key is also an API key"):
        ServerSettings(api_keys={"same": None}, admin_key="same")


KEYS = {"key-alpha": "alpha", "key-beta": "beta", "key-plain": None}
ADMIN = "key-admin"


@pytest.fixture(scope="module")
def auth_client(store_pipe):
    with TestClient(create_app(store_pipe, ServerSettings(api_keys=KEYS, admin_key=ADMIN))) as c:
        yield c


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": "Basic key-alpha"},
                                     {"Authorization": "Bearer "}, bearer("key-alph"), bearer("key-alpha2")])
@pytest.mark.parametrize("method, path", [("POST", "/query"), ("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json")])
def test_401_without_a_valid_key(auth_client, headers, method, path):
    r = auth_client.request(method, path, headers=headers, json={"question": "q"})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"


def test_valid_key_is_served(auth_client):
    assert auth_client.get("/healthz").status_code == 200  # no key needed
    assert auth_client.get("/v1/models", headers=bearer("key-plain")).status_code == 200
    assert auth_client.get("/openapi.json", headers=bearer("key-beta")).json()["paths"]["/query"]


@pytest.mark.parametrize("key", ["key-beta", "key-plain"])
def test_metrics_need_the_admin_key(auth_client, key):
    # Global figures show every tenant's traffic: an API key is not enough.
    r = auth_client.get("/metrics", headers=bearer(key))
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    assert auth_client.get("/metrics", headers=bearer(ADMIN)).status_code == 200
    # The admin key is not an API key.
    assert auth_client.post("/query", headers=bearer(ADMIN), json={"question": "q"}).status_code == 401


def test_metrics_without_an_admin_key_configured_say_how_to_set_one(store_pipe):
    with TestClient(create_app(store_pipe, ServerSettings(api_keys=KEYS))) as c:
        r = c.get("/metrics", headers=bearer("key-plain"))
        assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]
    with TestClient(create_app(store_pipe, ServerSettings(api_keys=KEYS, public_metrics=True))) as c:
        assert c.get("/metrics").status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_interactive_docs_are_off_with_keys(auth_client, client, path):
    # A browser page cannot send the bearer key, so with keys the pages are gone (the schema needs a key).
    assert auth_client.get(path, headers=bearer("key-plain")).status_code == 404
    assert client.get(path).status_code == 200


def ask(c, key: str, **payload) -> dict:
    r = c.post("/query", headers=bearer(key), json={"question": "Which river ends in the Black Sea?",
                                                    "max_new_tokens": 2, **payload})
    assert r.status_code == 200, r.text
    return r.json()


def test_tenants_do_not_hit_each_others_chunks(auth_client):
    first = ask(auth_client, "key-alpha", documents=TENANT_DOCS)
    assert first["stats"]["chunk_misses"] == 2 and not any(s["hit"] for s in first["sources"])
    assert ask(auth_client, "key-alpha", documents=TENANT_DOCS)["stats"]["chunk_hits"] == 2
    other = ask(auth_client, "key-beta", documents=TENANT_DOCS)
    assert other["stats"]["chunk_hits"] == 0 and not any(s["hit"] for s in other["sources"])
    assert {s["key"] for s in other["sources"]}.isdisjoint(s["key"] for s in first["sources"])
    assert ask(auth_client, "key-beta", documents=TENANT_DOCS)["stats"]["chunk_hits"] == 2
    # Same tensors, different keys: the answers agree.
    assert other["token_ids"] == first["token_ids"]


def test_store_chunks_are_hits_for_every_tenant(auth_client, store_pipe):
    # Ingested chunks existed before any request: every tenant reads the store's own copy, none is added.
    entries = len(store_pipe.rt.store.kv)
    for key in ("key-alpha", "key-beta", "key-plain"):
        answer = ask(auth_client, key, top_k=3)
        assert answer["stats"]["chunk_hits"] == 3 and all(s["hit"] for s in answer["sources"])
    assert len(store_pipe.rt.store.kv) == entries


def test_shared_cache_lets_tenants_hit_each_other(store_pipe):
    docs = [d + " (shared)" for d in TENANT_DOCS]
    with TestClient(create_app(store_pipe, ServerSettings(api_keys=KEYS, shared_cache=True))) as c:
        assert ask(c, "key-alpha", documents=docs)["stats"]["chunk_misses"] == 2
        assert ask(c, "key-beta", documents=docs)["stats"]["chunk_hits"] == 2
        assert ask(c, "key-plain", top_k=3)["stats"]["chunk_hits"] == 3


# -- /v1 (shapes; the openai client itself is driven in test_server_openai.py) ------------------------------
def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny-random-0"]
    assert client.get("/v1/models/tiny-random-0").json()["object"] == "model"
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_chat_completion_shape(client, store_pipe):
    # The system message is the request's own system prompt; its prefix KV is computed once, then kept.
    for _ in range(2):  # the first computes it, the second is what the server will do
        direct = store_pipe.query("Where is Everest?", documents=DOCS, max_new_tokens=5,
                                  system_prompt="Answer briefly.")
    r = client.post("/v1/chat/completions", json={
        "model": "tiny-random-0", "messages": [{"role": "system", "content": "Answer briefly."},
                                          {"role": "user", "content": [{"type": "text", "text": "Where is "},
                                                                       {"type": "text", "text": "Everest?"}]}],
        "documents": DOCS, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-random-0"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": direct.text, "refusal": None}
    assert choice["finish_reason"] == direct.finish_reason
    content = choice["logprobs"]["content"]
    assert len(content) == len(direct.token_ids) and all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert body["usage"] == {"prompt_tokens": direct.stats.prompt_tokens,
                             "completion_tokens": direct.stats.completion_tokens,
                             "total_tokens": direct.stats.prompt_tokens + direct.stats.completion_tokens,
                             "prompt_tokens_details": {"cached_tokens": direct.stats.cached_tokens}}
    assert body["chunkcache"]["stats"]["chunk_hits"] == 3


def test_chat_honours_the_system_message_and_earlier_turns(client, store_pipe):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Hello Ada."}, {"role": "user", "content": "What is my name?"}]
    body = client.post("/v1/chat/completions", json={"messages": messages, "documents": DOCS, "max_tokens": 4}).json()
    direct = store_pipe.query("What is my name?", documents=DOCS, max_new_tokens=4, system_prompt="Be terse.",
                              history=messages[1:3])
    assert body["choices"][0]["message"]["content"] == direct.text
    assert body["usage"]["prompt_tokens"] == direct.stats.prompt_tokens
    alone = store_pipe.query("What is my name?", documents=DOCS, max_new_tokens=4)
    assert direct.stats.prompt_tokens > alone.stats.prompt_tokens  # the system prompt and turns are in it


def test_query_takes_a_system_prompt_turns_and_retrieval_off(client, store_pipe):
    extra = {"system_prompt": "Be terse.", "history": [{"role": "user", "content": "I am Ada."},
                                                       {"role": "assistant", "content": "Hi Ada."}]}
    r = client.post("/query", json={"question": "What is my name?", "top_k": 0, "max_new_tokens": 3, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    direct = store_pipe.query("What is my name?", top_k=0, max_new_tokens=3, **extra)
    assert body["sources"] == [] and body["token_ids"] == direct.token_ids
    r = client.post("/query", json={"question": "q", "history": [{"role": "system", "content": "x"}]})
    assert r.status_code == 422 and "history" in r.json()["error"]["message"]


def test_chat_logprobs_without_top_logprobs(client):
    body = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Amazon?"}], "documents": DOCS[:1], "max_tokens": 3,
        "logprobs": True}).json()
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


@pytest.mark.parametrize("extra, message", [
    ({"n": 2, "stream": True}, "n=2 with stream=true is not supported"),
    ({"n": 9}, "n:"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 items"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "token ids"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools are not supported"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs=true"),
    ({"messages": [{"role": "system", "content": "s"}]}, "the last message must be the user's question"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "assistant prefill is not supported"),
    ({"messages": [{"role": "tool", "content": "r"}, {"role": "user", "content": "q"}]},
     "tool messages are not supported"),
    ({"messages": [{"role": "user", "content": "  "}]}, "the last user message is empty"),
    ({"messages": [{"role": "user", "content": "x" * 100_001}]}, "the last user message has 100001 characters"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only text content"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url"}]}, {"role": "user", "content": "q"}]},
     "only text content"),  # in an earlier message too (found by the fuzzer: it was a 500)
    ({"messages": []}, "messages:"),
    ({"max_tokens": 0}, "max_tokens:"),
    ({"temperature": 3}, "temperature:"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs:"),
    ({"frequency_penalty": 2.5}, "frequency_penalty:"),
])
def test_chat_validation_422(client, extra, message):
    payload = {"messages": [{"role": "user", "content": "q"}], "documents": DOCS[:1], "max_tokens": 2, **extra}
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]


def test_chat_decoding_options_and_n_choices(client, store_pipe):
    question = {"messages": [{"role": "user", "content": "Where is Everest?"}], "documents": DOCS}
    options = {"stop": ["zzz-never"], "frequency_penalty": 0.4, "presence_penalty": 0.2, "logit_bias": {"42": -5}}
    body = client.post("/v1/chat/completions", json={**question, "max_tokens": 6, **options}).json()
    direct = store_pipe.query("Where is Everest?", documents=DOCS, max_new_tokens=6, **options)
    assert body["choices"][0]["message"]["content"] == direct.text
    # n choices, sampled with seed, seed+1, ...: each as the same request alone with its seed.
    body = client.post("/v1/chat/completions", json={**question, "max_tokens": 6, "n": 3, "seed": 7,
                                                     "temperature": 1.0}).json()
    texts = [c["message"]["content"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert texts == [store_pipe.query("Where is Everest?", documents=DOCS, max_new_tokens=6, seed=7 + i,
                                      temperature=1.0).text for i in range(3)]
    usage = body["usage"]  # one prompt, every choice's tokens
    assert 3 <= usage["completion_tokens"] <= 18
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_ignores_unknown_fields_and_default_penalties(client):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "q"}], "documents": DOCS[:1], "max_tokens": 2, "user": "u1",
        "presence_penalty": 0, "n": 1, "response_format": {"type": "text"}, "metadata": {"a": "b"}})
    assert r.status_code == 200, r.text


def test_chat_stream_chunks(client):
    payload = {"messages": [{"role": "user", "content": "Where is Everest?"}], "documents": DOCS,
               "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        events = sse_events(r.read().decode())
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-2]["usage"] is None
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    plain = client.post("/v1/chat/completions", json={**payload, "stream": False}).json()
    assert text.strip() == plain["choices"][0]["message"]["content"]


# -- /metrics ------------------------------------------------------------------------------------------
def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_and_cache(store_pipe):
    metrics = Metrics()
    with TestClient(create_app(store_pipe, metrics=metrics)) as c:
        c.post("/query", json={"question": "Amazon?", "documents": DOCS[:2], "max_new_tokens": 2})
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Paris?"}],
                                             "documents": DOCS[2:], "max_tokens": 2})
        c.post("/query", json={"question": ""})
        got = samples(c.get("/metrics").text)
        assert c.get("/metrics").headers["content-type"].startswith("text/plain")
    assert got[("chunkcache_requests_total", (("endpoint", "/query"), ("status", "200")))] == 1
    assert got[("chunkcache_requests_total", (("endpoint", "/query"), ("status", "422")))] == 1
    assert got[("chunkcache_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
    assert got[("chunkcache_queries_total", (("mode", "blend"),))] == 2
    assert got[("chunkcache_ttft_seconds_count", (("mode", "blend"),))] == 2
    assert got[("chunkcache_request_duration_seconds_count", (("endpoint", "/query"),))] == 2
    assert got[("chunkcache_chunk_hits_total", ())] + got[("chunkcache_chunk_misses_total", ())] == 3
    assert got[("chunkcache_reused_tokens_total", ())] > 0 and got[("chunkcache_recomputed_tokens_total", ())] > 0
    # The engine's series, in the names vLLM's dashboards use, and the standard process ones.
    assert got[("chunkcache_num_requests_running", ())] == 0 and got[("chunkcache_num_requests_waiting", ())] == 0
    assert got[("chunkcache_kv_cache_bytes", ())] == 0
    assert ("chunkcache_kv_cache_allocated_bytes", ()) in got  # the whole pool (kept a while after requests)
    for name in ("request_queue_time_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds"):
        assert got[(f"chunkcache_{name}_count", ())] == 2
    assert got[("process_cpu_seconds_total", ())] > 0 and ("python_info" in {name for name, _ in got})
    assert all(name.startswith(("chunkcache_", "process_", "python_")) for name, _ in got)


def test_metrics_count_documents_not_stored(tmp_path, tiny_lm, hash_embedder):
    pipe = open_store_pipeline(tmp_path, tiny_lm, hash_embedder, ingest=False, persist_documents=False)
    metrics = Metrics()
    try:
        with TestClient(create_app(pipe, metrics=metrics)) as c:
            for _ in range(2):
                r = c.post("/query", json={"question": "Amazon?", "documents": DOCS[:2], "max_new_tokens": 1})
                assert r.json()["stats"]["unstored_chunks"] == 2
            got = samples(c.get("/metrics").text)
    finally:
        pipe.close()
    assert got[("chunkcache_unstored_chunks_total", ())] == 4


class CancellingPipeline(FakePipeline):
    """Its client "leaves" at once: the `cancelled` poll is True before and during decoding."""

    def query(self, question, cancelled=None, **kwargs):
        assert cancelled is not None, "the server did not pass its disconnect poll"
        if self.error is not None:
            raise self.error
        answer = fake_answer("cut short")
        answer.finish_reason = "cancelled"
        return answer


def test_metrics_count_cancelled_requests():
    from chunkcache.pipeline import RequestCancelled

    for pipe, status in [(CancellingPipeline(error=RequestCancelled("gone before the model")), 499),
                         (CancellingPipeline(), 200)]:
        metrics = Metrics()
        with TestClient(create_app(pipe, metrics=metrics)) as c:
            assert c.post("/query", json={"question": "hi"}).status_code == status
            got = samples(c.get("/metrics").text)
        assert got[("chunkcache_cancelled_requests_total", ())] == 1


def test_metrics_are_per_app_and_can_be_disabled(store_pipe):
    with TestClient(create_app(store_pipe, metrics=NoMetrics())) as c:
        c.post("/query", json={"question": "Amazon?", "documents": DOCS[:1], "max_new_tokens": 1})
        assert c.get("/metrics").text == ""
    fresh = Metrics()
    with TestClient(create_app(store_pipe, metrics=fresh)) as c:
        got = samples(c.get("/metrics").text)
    assert ("chunkcache_queries_total", (("mode", "blend"),)) not in got


def test_openapi_schema_states_the_bounds(client):
    schema = client.get("/openapi.json").json()
    query = schema["components"]["schemas"]["QueryRequest"]["properties"]
    assert query["question"]["maxLength"] == 100_000
    assert query["top_k"]["anyOf"][0]["minimum"] == 0  # 0: retrieval off
    assert query["max_new_tokens"]["anyOf"][0]["maximum"] == 2048
    assert schema["paths"]["/query"]["post"]["responses"]["422"]


# -- serve(args, open_pipeline): the CLI's entry point -------------------------------------------------------------------
class ServeArgs:
    store, host, port = "unused", "0.0.0.0", 0


def fake_uvicorn_run(monkeypatch, body):
    """Replace uvicorn.Server.run with `body(server)`: serve() builds everything else for real."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: body(self))


def test_serve_builds_the_pipeline_at_startup_with_env_keys(monkeypatch, caplog):
    from chunkcache.server import serve

    pipe = FakePipeline()
    monkeypatch.setenv("CHUNKCACHE_API_KEYS", "env-key:team")
    seen = {}

    def run(server):
        with TestClient(server.config.app) as c:
            deadline = time.monotonic() + 10
            while c.get("/healthz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            seen["no_key"] = c.post("/query", json={"question": "q"}).status_code
            seen["key"] = c.post("/query", json={"question": "q"}, headers=bearer("env-key")).status_code

    fake_uvicorn_run(monkeypatch, run)
    with caplog.at_level(logging.WARNING, "chunkcache.server"):
        serve(ServeArgs(), lambda: pipe)
    assert seen == {"no_key": 401, "key": 200} and pipe.closed
    assert "without API keys" not in caplog.text


def test_serve_warns_without_keys_off_loopback_and_stops_when_loading_fails(monkeypatch, caplog):
    from chunkcache.server import serve

    def broken():
        raise OSError("weights missing")

    monkeypatch.delenv("CHUNKCACHE_API_KEYS", raising=False)

    def run(server):
        with TestClient(server.config.app):
            deadline = time.monotonic() + 10
            while not server.should_exit:  # set by the failed load
                assert time.monotonic() < deadline
                time.sleep(0.01)

    fake_uvicorn_run(monkeypatch, run)
    with caplog.at_level(logging.WARNING, "chunkcache.server"), pytest.raises(RuntimeError, match="failed to load"):
        serve(ServeArgs(), broken)
    assert "without API keys" in caplog.text and "weights missing" in caplog.text


# -- request ids, CORS, health alias, version, model card -------------------------------------------------
def test_every_response_carries_a_request_id(client, caplog):
    with caplog.at_level(logging.INFO, "chunkcache.server"):
        mine = client.get("/healthz", headers={"X-Request-Id": "trace-42.a"})
        made = client.get("/healthz")
        bad = client.get("/healthz", headers={"X-Request-Id": "no spaces\tor tabs"})
        error = client.post("/query", json={"question": ""})
    assert mine.headers["x-request-id"] == "trace-42.a"
    assert len(made.headers["x-request-id"]) == 32 and bad.headers["x-request-id"] != "no spaces\tor tabs"
    assert error.status_code == 422 and error.headers["x-request-id"]
    assert "request trace-42.a GET /healthz -> 200" in caplog.text


def test_cors_is_off_by_default_and_answers_the_configured_origins(store_pipe):
    plain = TestClient(create_app(store_pipe)).get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers
    with TestClient(create_app(store_pipe, ServerSettings(cors_origins=("https://app.example",)))) as c:
        ok = c.options("/query", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "authorization,content-type"})
        other = c.get("/healthz", headers={"Origin": "https://evil.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


def test_health_alias_version_and_context_length(client):
    from chunkcache import __version__

    assert client.get("/health").json() == client.get("/healthz").json()
    assert client.get("/version").json() == {"version": __version__} and __version__ != "0+unknown"
    card = client.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == 2048  # the tiny model's max_position_embeddings
