"""A real uvicorn on loopback, driven by the `openai` client (as ChatOpenAI(base_url=...) would drive it)
and by httpx: streaming, auth, errors, concurrent requests and clients that leave mid-stream."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from chunkcache.server import Metrics, ServerSettings, create_app

from .conftest import DOCS, wait_until_idle
from .test_server import open_store_pipeline, sse_events

KEYS = {"key-plain": None, "key-alpha": "alpha"}
QUESTIONS = ["Where is Mount Everest?", "What carries the most water?", "Who designed the tower?",
             "Which fair was in 1889?", "Where is Nepal?", "How high is Everest?", "What flows through Brazil?",
             "Where is the Himalaya?"]


@contextlib.contextmanager
def running_server(app):
    """uvicorn serving `app` on a free loopback port, in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_lm, hash_embedder):
    p = open_store_pipeline(tmp_path_factory.mktemp("uvicorn"), tiny_lm, hash_embedder)
    yield p
    p.close()


@pytest.fixture(scope="module")
def metrics():
    return Metrics()


@pytest.fixture(scope="module")
def base_url(pipe, metrics):
    with running_server(create_app(pipe, ServerSettings(api_keys=KEYS), metrics=metrics)) as url:
        yield url


def num_cancelled(metrics) -> float:
    return metrics.registry.get_sample_value("chunkcache_cancelled_requests_total")


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="key-plain", max_retries=0, timeout=60)


def chat(client, question: str, **kwargs):
    return client.chat.completions.create(model="tiny-random-0", messages=[{"role": "user", "content": question}],
                                          max_tokens=6, **kwargs)


def test_openai_chat(client, pipe):
    r = chat(client, "Where is Mount Everest?", extra_body={"documents": DOCS})
    direct = pipe.query("Where is Mount Everest?", documents=DOCS, max_new_tokens=6)
    assert r.choices[0].message.content == direct.text and r.choices[0].finish_reason == direct.finish_reason
    assert r.model == "tiny-random-0" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == direct.stats.prompt_tokens
    assert r.usage.completion_tokens == direct.stats.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == direct.stats.cached_tokens > 0
    assert r.model_extra["chunkcache"]["stats"]["chunk_hits"] == 3


def test_openai_chat_retrieves_from_the_store(client):
    r = chat(client, "Eiffel Tower Paris", extra_body={"top_k": 2})
    sources = r.model_extra["chunkcache"]["sources"]
    assert len(sources) == 2 and "Eiffel" in sources[0]["text"] and all(s["hit"] for s in sources)


def test_openai_stream(client):
    stream = chat(client, "Where does the Amazon flow?", extra_body={"documents": DOCS}, stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    plain = chat(client, "Where does the Amazon flow?", extra_body={"documents": DOCS})
    assert text.strip() == plain.choices[0].message.content and finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_openai_logprobs_and_seed(client):
    kwargs = dict(extra_body={"documents": DOCS[:1]}, logprobs=True, top_logprobs=3, temperature=0.9, seed=11)
    r = chat(client, "Amazon?", **kwargs)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 for c in content)
    again = chat(client, "Amazon?", **kwargs)
    assert again.choices[0].message.content == r.choices[0].message.content


def test_openai_chat_with_stop_n_and_a_system_message(client, pipe):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Where is Mount Everest?"}]
    plain = pipe.query("Where is Mount Everest?", documents=DOCS, max_new_tokens=6, system_prompt="Be terse.")
    stop = plain.text[3:6]
    r = client.chat.completions.create(model="tiny-random-0", messages=messages, max_tokens=6, stop=[stop],
                                       extra_body={"documents": DOCS})
    assert r.choices[0].message.content == plain.text[:plain.text.find(stop)].strip()
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny-random-0", messages=messages, max_tokens=4, n=2, seed=3,
                                       temperature=1.0, extra_body={"documents": DOCS})
    assert len(r.choices) == 2


def test_openai_multi_turn_recall_is_in_the_prompt(client, pipe):
    turns = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."},
             {"role": "user", "content": "What is my name?"}]
    r = client.chat.completions.create(model="tiny-random-0", messages=turns, max_tokens=5,
                                       extra_body={"documents": DOCS[:1]})
    direct = pipe.query("What is my name?", documents=DOCS[:1], max_new_tokens=5, history=turns[:2])
    assert r.choices[0].message.content == direct.text and r.usage.prompt_tokens == direct.stats.prompt_tokens
    alone = pipe.query("What is my name?", documents=DOCS[:1], max_new_tokens=5)
    assert direct.stats.prompt_tokens > alone.stats.prompt_tokens  # the earlier turns are not dropped


def test_openai_completions(client, pipe):
    """The legacy completions API, as LlamaIndex's OpenAILike (is_chat_model=False) calls it."""
    direct = pipe.query("Where is Mount Everest?", documents=DOCS, max_new_tokens=5)
    r = client.completions.create(model="tiny-random-0", prompt="Where is Mount Everest?", max_tokens=5,
                                  extra_body={"documents": DOCS})
    assert r.object == "text_completion" and r.choices[0].text == direct.text
    assert r.usage.completion_tokens == direct.stats.completion_tokens
    stream = client.completions.create(model="tiny-random-0", prompt="Where is Mount Everest?", max_tokens=5,
                                       stream=True, extra_body={"documents": DOCS})
    assert "".join(c.choices[0].text for c in stream if c.choices).strip() == direct.text
    r = client.completions.create(model="tiny-random-0", prompt="Where is Mount Everest?", max_tokens=3, logprobs=2,
                                  extra_body={"documents": DOCS})
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    assert all(len(top) == 2 for top in r.choices[0].logprobs.top_logprobs)


def test_openai_embeddings_are_the_store_s_embedder(client, pipe):
    texts = ["Mount Everest is high.", "Rivers flow."]
    expected = pipe.embed(texts)
    r = client.embeddings.create(model=pipe.config.embedder, input=texts)  # the client asks for base64
    assert [d.index for d in r.data] == [0, 1]
    for row, vector in zip(r.data, expected):
        assert row.embedding == pytest.approx(vector.tolist(), abs=1e-6)
    floats = httpx.post(client.base_url.join("embeddings").__str__(), json={"input": texts[0]},
                        headers={"Authorization": "Bearer key-plain"}, timeout=30).json()
    assert floats["data"][0]["embedding"] == pytest.approx(expected[0].tolist(), abs=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_tokenize_and_detokenize(base_url, pipe):
    headers = {"Authorization": "Bearer key-plain"}
    r = httpx.post(f"{base_url}/tokenize", json={"prompt": "Where is <|im_start|> Everest?"}, headers=headers).json()
    assert r["tokens"] == pipe.tokenize("Where is <|im_start|> Everest?") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 2048
    back = httpx.post(f"{base_url}/detokenize", json={"tokens": r["tokens"]}, headers=headers).json()
    assert back["prompt"] == "Where is <|im_start|> Everest?"
    bad = httpx.post(f"{base_url}/detokenize", json={"tokens": [10**8]}, headers=headers)
    assert bad.status_code == 422 and "not in the vocabulary" in bad.json()["error"]["message"]


def test_openai_models(client):
    assert [m.id for m in client.models.list()] == ["tiny-random-0"]
    assert client.models.retrieve("tiny-random-0").owned_by == "chunkcache"
    assert client.models.retrieve("tiny-random-0").model_extra["max_model_len"] == 2048


def test_an_unknown_model_is_a_404_not_a_silent_substitute(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.code == "model_not_found" and "tiny-random-0" in info.value.message


def test_openai_errors(client, base_url):
    with pytest.raises(openai.UnprocessableEntityError, match="with stream=true is not supported"):
        list(chat(client, "q", n=2, stream=True, extra_body={"documents": DOCS[:1]}))
    with pytest.raises(openai.UnprocessableEntityError, match="store holds only 3 chunks"):
        chat(client, "q", extra_body={"top_k": 9})
    with pytest.raises(openai.UnprocessableEntityError, match="store holds only 3 chunks"):
        list(chat(client, "q", extra_body={"top_k": 9}, stream=True))
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat(bad, "q", extra_body={"documents": DOCS[:1]})


def test_tenant_key_over_http(base_url):
    alpha = openai.OpenAI(base_url=f"{base_url}/v1", api_key="key-alpha", max_retries=0)
    docs = ["Tenant-only text about the Atacama desert, the driest place outside the poles."]
    first = chat(alpha, "Atacama?", extra_body={"documents": docs}).model_extra["chunkcache"]["stats"]
    second = chat(alpha, "Atacama?", extra_body={"documents": docs}).model_extra["chunkcache"]["stats"]
    assert (first["chunk_misses"], second["chunk_hits"]) == (1, 1)


def test_query_endpoint_streams_over_http(base_url):
    payload = {"question": "Where is Everest?", "documents": DOCS, "stream": True, "max_new_tokens": 6}
    with httpx.stream("POST", f"{base_url}/query", json=payload, headers={"Authorization": "Bearer key-plain"},
                      timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r.read().decode())
    assert events[-1][0] == "answer" and json.loads(events[-1][1])["stats"]["chunk_hits"] == 3
    assert httpx.get(f"{base_url}/healthz").status_code == 200


def test_concurrent_requests_get_the_sequential_answers(client, base_url):
    """8 requests at once (half streamed) answer exactly as one at a time: no request sees another's KV."""
    def ask(i: int) -> str:
        docs = [DOCS[i % 3], DOCS[(i + 1) % 3]]
        if i % 2:
            stream = chat(client, QUESTIONS[i], extra_body={"documents": docs}, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
        return chat(client, QUESTIONS[i], extra_body={"documents": docs}).choices[0].message.content

    sequential = [ask(i) for i in range(len(QUESTIONS))]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        concurrent = list(pool.map(ask, range(len(QUESTIONS))))
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # the questions really differ


def test_a_batch_survives_a_client_leaving_an_invalid_request_and_a_failing_prefill(client, base_url, pipe,
                                                                                   monkeypatch):
    """8 clients at once: one leaves mid-stream, one sends an invalid request, one's prefill raises; the
    other five get exactly the answers they get alone."""
    def ask(i: int) -> str:
        stream = chat(client, QUESTIONS[i], extra_body={"documents": DOCS[:2]}, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()

    alone = {i: ask(i) for i in (0, 2, 3, 5, 6)}
    place = pipe._place_kv

    def failing(staged, cache=None):
        if staged.req.question == QUESTIONS[7]:
            raise RuntimeError("the disk went away")
        place(staged, cache)

    monkeypatch.setattr(pipe, "_place_kv", failing)
    headers = {"Authorization": "Bearer key-plain"}

    def leave() -> str:
        payload = {"question": QUESTIONS[1], "documents": DOCS, "stream": True, "max_new_tokens": 1500}
        with httpx.stream("POST", f"{base_url}/query", json=payload, headers=headers, timeout=60) as r:
            next(r.iter_lines())
        return "left"

    def invalid() -> int:
        return httpx.post(f"{base_url}/query", json={"question": QUESTIONS[4], "top_k": -3}, headers=headers,
                          timeout=60).status_code

    def fails() -> int:
        return httpx.post(f"{base_url}/query", json={"question": QUESTIONS[7], "documents": DOCS},
                          headers=headers, timeout=60).status_code

    jobs = {i: (lambda i=i: ask(i)) for i in alone} | {1: leave, 4: invalid, 7: fails}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {i: pool.submit(job) for i, job in jobs.items()}
        got = {i: f.result() for i, f in futures.items()}
    assert {i: got[i] for i in alone} == alone
    assert got[1] == "left" and got[4] == 422 and got[7] == 500
    wait_until_idle(pipe, 10, "the engine still decodes for the client that left")


def test_a_client_leaving_mid_stream_frees_the_model(base_url, pipe, metrics):
    cancelled = num_cancelled(metrics)
    payload = {"question": "Tell me everything about rivers.", "documents": DOCS, "stream": True,
               "max_new_tokens": 1500}
    with httpx.stream("POST", f"{base_url}/query", json=payload, headers={"Authorization": "Bearer key-plain"},
                      timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    # Decoding 1500 tokens takes ~20 s on the tiny model; the engine drops it at its next step instead.
    wait_until_idle(pipe, 5, "the engine still decodes a stream nobody reads")
    r = httpx.post(f"{base_url}/query", json={"question": "Everest?", "documents": DOCS[:1], "max_new_tokens": 2},
                   headers={"Authorization": "Bearer key-plain"}, timeout=60)
    assert r.status_code == 200
    assert num_cancelled(metrics) == cancelled + 1


def test_a_client_leaving_a_plain_request_cancels_it(base_url, pipe, metrics, monkeypatch):
    cancelled = num_cancelled(metrics)
    answers = []
    query = pipe.query
    monkeypatch.setattr(pipe, "query", lambda *a, **k: answers.append(query(*a, **k)) or answers[-1])
    payload = {"question": "Tell me everything about rivers.", "documents": DOCS, "max_new_tokens": 1500}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{base_url}/query", json=payload, headers={"Authorization": "Bearer key-plain"}, timeout=1.0)
    # Decoding 1500 tokens takes ~20 s on the tiny model; the server stops within a poll and a token instead.
    deadline = time.monotonic() + 5
    while not answers:
        assert time.monotonic() < deadline, "the model is still busy with an answer nobody waits for"
        time.sleep(0.05)
    assert answers[0].finish_reason == "cancelled" and answers[0].stats.completion_tokens < 1500
    assert time.monotonic() - started < 6
    deadline = time.monotonic() + 5  # counted once the handler resumes after the worker thread
    while num_cancelled(metrics) != cancelled + 1:
        assert time.monotonic() < deadline, f"cancelled requests counted: {num_cancelled(metrics)}"
        time.sleep(0.05)
