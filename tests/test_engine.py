"""The engine (continuous batching): batched answers equal answers alone, limits hold, failures stay put."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from chunkcache.engine import EngineLimits
from chunkcache.errors import EngineBusy, QueryError, RequestCancelled

from .conftest import DOCS, make_tiny_lm, needs_bf16_linears, open_tiny_pipe, wait_until_idle

QUESTIONS = ["Where is Mount Everest?", "What carries the most water?", "Who designed the tower?",
             "Which fair was in 1889?", "Where is Nepal?", "How high is Everest?", "What flows through Brazil?",
             "Where is the Himalaya?"]
# Every mode and selection in one batch: probe (batched reuse pass), a check-layer selection (run whole,
# alone in its step), reuse, epic and full.
MODES = [dict(mode="blend"), dict(mode="blend", selection="deviation", check_layer=1), dict(mode="reuse"),
         dict(mode="full"), dict(mode="epic"), dict(mode="blend", recompute_ratio=0.5, selection="impact"),
         dict(mode="blend", chunk_scale="off"), dict(mode="full", max_new_tokens=3)]


@pytest.fixture
def pipe(tmp_path, tiny_lm, hash_embedder):
    # Prefills batched too (max_prefilling=8, as on a GPU): the harder case for batch invariance. The CPU
    # default, one prefill at a time, has tests of its own below.
    p = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, max_new_tokens=12, max_prefilling=8)
    yield p
    p.close()


def _alone(pipe, question, **kwargs):
    answer = pipe.query(question, documents=DOCS, **kwargs)
    assert pipe.engine.counts().running == 0
    return answer


def _together(pipe, kwargs_list):
    tickets = [pipe.submit(q, documents=DOCS, **kw) for q, kw in zip(QUESTIONS, kwargs_list)]
    return [[e for e in t][-1] for t in tickets]


def test_greedy_answers_batched_with_seven_others_equal_answers_alone(pipe):
    _check_batched_equals_alone(pipe)


def test_greedy_answers_equal_alone_with_one_prefill_at_a_time(tmp_path, tiny_lm, hash_embedder):
    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, max_new_tokens=12) as p:
        assert p.engine.limits.max_prefilling == 1  # the CPU default
        _check_batched_equals_alone(p)


@needs_bf16_linears
def test_batched_equals_alone_with_bfloat16_linear_weights(tmp_path, tokenizer, hash_embedder):
    """bf16 weights (chunkcache/cpu_linear.py) keep the batch invariance: oneDNN's product of a row does not
    depend on the rows beside it."""
    lm = make_tiny_lm(tokenizer, linear_dtype="bfloat16")
    assert lm.linear_dtype == "bfloat16"
    with open_tiny_pipe(tmp_path, lm, hash_embedder, max_new_tokens=12) as p:
        _check_batched_equals_alone(p)


def _check_batched_equals_alone(pipe):
    alone = [_alone(pipe, q, **kw) for q, kw in zip(QUESTIONS, MODES)]
    steps_before = pipe.engine.counts().steps
    together = _together(pipe, MODES)
    counts = pipe.engine.counts()
    assert counts.peak_batch >= 6  # they did share forwards (the check-layer one prefills alone)
    assert counts.steps - steps_before < sum(len(a.token_ids) for a in alone)
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        assert b.stats.recomputed_tokens == a.stats.recomputed_tokens


def test_seeded_sampling_is_reproducible_per_request_in_a_batch(pipe):
    sampled = [dict(temperature=1.0, top_p=0.9, seed=i) for i in range(len(QUESTIONS))]
    alone = [_alone(pipe, q, **kw) for q, kw in zip(QUESTIONS, sampled)]
    together = _together(pipe, sampled)
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert len({tuple(a.token_ids) for a in alone}) > 1  # not all the same sample


def test_a_prefill_split_over_steps_equals_one_prefill(tmp_path, tiny_lm, hash_embedder, pipe):
    whole = [_alone(pipe, QUESTIONS[0], mode=mode) for mode in ("full", "blend", "reuse")]
    split = open_tiny_pipe(tmp_path / "split", tiny_lm, hash_embedder, max_new_tokens=12, max_batched_tokens=8,
                           max_running=4)
    try:
        pieces = [split.query(QUESTIONS[0], documents=DOCS, mode=mode) for mode in ("full", "blend", "reuse")]
        assert split.engine.counts().steps > 100 // 8  # the ~100-token full prefill took many steps
    finally:
        split.close()
    for a, b in zip(whole, pieces):
        assert b.token_ids == a.token_ids


def test_one_request_at_a_time_with_max_running_1(tmp_path, tiny_lm, hash_embedder):
    one = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, max_running=1)
    try:
        answers = one.query_many(QUESTIONS[:4], documents=DOCS)
        assert one.engine.counts().peak_batch == 1 and all(a.text for a in answers)
        # Each later request waited for the ones before it.
        assert [a.timings.queue_s for a in answers] == sorted(a.timings.queue_s for a in answers)
    finally:
        one.close()


def test_the_queue_is_bounded(tmp_path, tiny_lm, hash_embedder):
    p = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, max_waiting=2)
    try:
        with p.rt.lock:  # the engine cannot take a step, so submissions stay queued
            first = [p.submit(q, documents=DOCS) for q in QUESTIONS[:2]]
            time.sleep(0.05)
            with pytest.raises(EngineBusy, match="max_waiting=2"):
                p.submit(QUESTIONS[2], documents=DOCS)
        assert all(list(t)[-1].text for t in first)
    finally:
        p.close()


def test_kv_memory_is_accounted_so_requests_wait_for_it(tmp_path, tiny_lm, hash_embedder, pipe):
    staged = pipe._plan(pipe._request(QUESTIONS[0], None, DOCS, "blend", None, 8, 0.0, 1.0, 0, None, None))
    one = pipe.kv_bytes(staged)
    p = open_tiny_pipe(tmp_path / "tight", tiny_lm, hash_embedder, max_kv_bytes=int(one * 1.5))
    try:
        answers = p.query_many([QUESTIONS[0]] * 3, documents=DOCS)
        assert p.engine.counts().peak_batch == 1  # only one fitted at a time; the others waited
        assert len({tuple(a.token_ids) for a in answers}) == 1
        with pytest.raises(QueryError, match="max_kv_bytes"):
            p.query(QUESTIONS[0], documents=DOCS, max_new_tokens=200)
        assert p.engine.counts().kv_bytes == 0
    finally:
        p.close()


def test_a_failing_prefill_does_not_disturb_the_batch(pipe, monkeypatch):
    expected = [_alone(pipe, q) for q in QUESTIONS[:4]]
    place = pipe._place_kv

    def flaky(staged, cache=None):
        if staged.req.question == QUESTIONS[1]:
            raise OSError("disk read failed")
        place(staged, cache)

    monkeypatch.setattr(pipe, "_place_kv", flaky)
    tickets = [pipe.submit(q, documents=DOCS) for q in QUESTIONS[:4]]
    results = []
    for ticket in tickets:
        try:
            results.append(list(ticket)[-1].token_ids)
        except OSError as exc:
            results.append(str(exc))
    assert results == [expected[0].token_ids, "disk read failed", expected[2].token_ids, expected[3].token_ids]
    assert pipe.engine.counts().kv_bytes == 0


def test_a_failing_forward_fails_only_its_request(pipe, monkeypatch):
    import chunkcache.engine as engine_module

    expected = [_alone(pipe, q) for q in QUESTIONS[:3]]
    real = engine_module.forward_batch
    poisoned = set()

    def forward_batch(lm, requests, **kwargs):
        if any(id(cache) in poisoned for cache, _, _ in requests):
            raise RuntimeError("boom")
        return real(lm, requests, **kwargs)

    place = pipe._place_kv

    def mark(staged, cache=None):
        place(staged, cache)
        if staged.req.question == QUESTIONS[2]:
            poisoned.add(id(staged.cache))

    monkeypatch.setattr(engine_module, "forward_batch", forward_batch)
    monkeypatch.setattr(pipe, "_place_kv", mark)
    tickets = [pipe.submit(q, documents=DOCS) for q in QUESTIONS[:3]]
    assert list(tickets[0])[-1].token_ids == expected[0].token_ids
    assert list(tickets[1])[-1].token_ids == expected[1].token_ids
    with pytest.raises(RuntimeError, match="boom"):
        list(tickets[2])


def test_a_reader_that_leaves_frees_its_slot_and_others_go_on(pipe):
    long = dict(max_new_tokens=40)
    expected = _alone(pipe, QUESTIONS[1], **long)
    leaving = pipe.events(QUESTIONS[0], documents=DOCS, **long)
    next(leaving)  # it has started decoding
    staying = pipe.submit(QUESTIONS[1], documents=DOCS, **long)
    leaving.close()  # the consumer stops reading: its ticket is cancelled
    assert list(staying)[-1].token_ids == expected.token_ids
    wait_until_idle(pipe, 10, "the engine still decodes for the reader that left")


def test_a_slow_reader_delays_only_itself(pipe):
    slow = pipe.events(QUESTIONS[0], documents=DOCS, max_new_tokens=30)
    next(slow)  # then it reads nothing for a while
    started = time.perf_counter()
    fast = pipe.query(QUESTIONS[1], documents=DOCS, max_new_tokens=30)
    assert fast.finish_reason in ("stop", "length") and time.perf_counter() - started < 30
    rest = list(slow)
    assert rest[-1].finish_reason in ("stop", "length")


def test_a_request_cancelled_while_queued_never_reaches_the_model(pipe):
    with pipe.rt.lock:
        ticket = pipe.submit(QUESTIONS[0], documents=DOCS)
        ticket.cancel()
    with pytest.raises(RequestCancelled):
        list(ticket)


def test_tenants_stay_isolated_inside_a_batch(pipe):
    tickets = [pipe.submit(QUESTIONS[0], documents=DOCS, namespace=ns) for ns in ("alpha", "beta")]
    first = [list(t)[-1] for t in tickets]
    # Batched together, neither tenant hit the other's just-computed chunks; each computed its own.
    assert [a.stats.chunk_misses for a in first] == [3, 3]
    assert {s.key for s in first[0].sources}.isdisjoint(s.key for s in first[1].sources)
    again = pipe.query(QUESTIONS[0], documents=DOCS, namespace="alpha")
    assert again.stats.chunk_hits == 3 and [s.key for s in again.sources] == [s.key for s in first[0].sources]


def test_query_many_from_many_threads(pipe):
    expected = {q: _alone(pipe, q).token_ids for q in QUESTIONS}
    got: dict[str, list[int]] = {}

    def ask(q):
        got[q] = pipe.query(q, documents=DOCS).token_ids

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_batched_tokens"):
        EngineLimits(max_running=8, max_batched_tokens=4, max_waiting=1, max_kv_bytes=1)
    from chunkcache.config import ChunkCacheConfig

    with pytest.raises(ValueError, match="max_running"):
        ChunkCacheConfig(max_running=0)
    with pytest.raises(ValueError, match="max_prefilling"):
        ChunkCacheConfig(max_prefilling=0)
    assert EngineLimits(max_running=8, max_batched_tokens=64, max_waiting=1, max_kv_bytes=1).max_prefilling == 8
    with pytest.raises(ValueError, match="positive"):
        EngineLimits(max_running=8, max_batched_tokens=64, max_waiting=1, max_kv_bytes=1, max_prefilling=0)
    with pytest.raises(ValueError, match="max_kv_bytes"):
        ChunkCacheConfig(max_kv_bytes=-5)


def test_requests_queued_together_are_admitted_together(tmp_path, tiny_lm, hash_embedder, monkeypatch):
    p = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, max_running=4, max_prefilling=4)
    sizes = []
    choose = p._choose_positions
    monkeypatch.setattr(p, "_choose_positions", lambda batch: sizes.append(len(batch)) or choose(batch))
    try:
        with p.rt.lock:  # all four are queued before the engine's first step
            tickets = [p.submit(q, documents=DOCS) for q in QUESTIONS[:4]]
        assert all(list(t)[-1].text for t in tickets)
        assert sizes[0] == 4  # one batched probe pass for the four
    finally:
        p.close()


def test_on_cpu_requests_prefill_one_after_another_in_arrival_order(tmp_path, tiny_lm, hash_embedder, monkeypatch):
    """The CPU default: a wave of requests gets its first tokens one by one, in arrival order, rather than
    all at the end of one batched prefill; their decode steps are still batched."""
    p = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, max_new_tokens=12)
    events = []
    place, prepared = p._place_kv, p._prepared
    monkeypatch.setattr(p, "_place_kv", lambda staged, cache: events.append(("admit", staged.req.question))
                        or place(staged, cache))
    monkeypatch.setattr(p, "_prepared", lambda staged, *rest: events.append(("first token", staged.req.question))
                        or prepared(staged, *rest))
    try:
        with p.rt.lock:  # all four are queued before the engine's first step
            tickets = [p.submit(q, documents=DOCS) for q in QUESTIONS[:4]]
        answers = [list(t)[-1] for t in tickets]
        assert all(a.text for a in answers)
        assert events == [(kind, q) for q in QUESTIONS[:4] for kind in ("admit", "first token")]
        assert p.engine.counts().peak_batch >= 2  # the later prefills ran beside the earlier requests' decode
        assert [a.timings.queue_s for a in answers] == sorted(a.timings.queue_s for a in answers)
    finally:
        p.close()


def test_a_failing_or_cancelled_prefill_lets_the_next_in_line_prefill(tmp_path, tiny_lm, hash_embedder, monkeypatch):
    """With one prefill at a time, the request prefilling is what the queue waits on: its failure or its
    cancellation must hand the turn on."""
    p = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder, max_new_tokens=12)
    place = p._place_kv

    def place_or_fail(staged, cache):
        if staged.req.question == QUESTIONS[0]:
            raise RuntimeError("this request's placement fails")
        return place(staged, cache)

    monkeypatch.setattr(p, "_place_kv", place_or_fail)
    try:
        with p.rt.lock:
            failing, cancelled, *rest = [p.submit(q, documents=DOCS) for q in QUESTIONS[:4]]
            cancelled.cancel()
        with pytest.raises(RuntimeError, match="placement fails"):
            list(failing)
        with pytest.raises(RequestCancelled):
            list(cancelled)
        assert all(list(t)[-1].text for t in rest)
        wait_until_idle(p, 10, "the engine kept a failed or cancelled request")
    finally:
        p.close()


def test_stop_engine_keeps_the_store_and_the_next_request_starts_a_new_one(tiny_pipe):
    first = tiny_pipe.query(QUESTIONS[0], documents=DOCS)
    engine = tiny_pipe.engine
    tiny_pipe.stop_engine()
    assert not engine._thread.is_alive()
    again = tiny_pipe.query(QUESTIONS[0], documents=DOCS)
    assert tiny_pipe.engine is not engine and again.token_ids == first.token_ids


@pytest.mark.slow
def test_a_script_that_never_closes_its_pipeline_exits_cleanly(tmp_path):
    """The loop thread is stopped at exit. Left in its wait while the interpreter finalised, it made the
    process abort (SIGABRT, "terminate called without an active exception") once a retrieval had run
    on it with the real embedder."""
    head = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); " \
           f"from chunkcache import RAGPipeline; pipe = RAGPipeline.open({str(tmp_path / 'store')!r}); "
    # An ~800-token prompt: a tiny one ran no parallel region on the loop thread and never aborted.
    texts = [" ".join(f"Fact {i}.{j}: tower {i} was designed by engineer {j} in {1800 + j}." for j in range(20))
             for i in range(6)]
    subprocess.run([sys.executable, "-c", head + f"pipe.ingest_texts({texts!r}, progress=False); pipe.close()"],
                   check=True, capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, "-c", head + "print(len(pipe.query('Who designed tower 3?', "
                           "max_new_tokens=2).token_ids))"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr and int(done.stdout.split()[-1]) > 0


def test_a_longer_request_grows_the_pool_under_a_decoding_one(pipe, monkeypatch):
    """The pool's slots are sized by the longest request so far (plus a quarter); a longer one resizes it, copying
    the running requests' rows: their answers are unchanged."""
    from chunkcache.kvcache import KVPool

    short, long = dict(max_new_tokens=40), dict(max_new_tokens=300)
    alone = [_alone(pipe, QUESTIONS[0], **short), _alone(pipe, QUESTIONS[1], **long)]
    resized = []
    grow = KVPool.resized
    monkeypatch.setattr(KVPool, "resized", lambda pool, *a: resized.append(pool.in_use) or grow(pool, *a))
    from chunkcache.engine import Engine

    decoding, go_on = threading.Event(), threading.Event()
    emit = Engine._emit

    def emit_then_hold(engine, active, pieces):  # the short request's first token holds the engine
        emit(engine, active, pieces)
        if not decoding.is_set():
            decoding.set()
            assert go_on.wait(10)

    monkeypatch.setattr(Engine, "_emit", emit_then_hold)
    pipe.engine._pool = None  # as after an idle while: the short request sizes a new pool
    first = pipe.submit(QUESTIONS[0], documents=DOCS, **short)
    assert decoding.wait(10)
    second = pipe.submit(QUESTIONS[1], documents=DOCS, **long)
    go_on.set()
    answers = [list(first)[-1], list(second)[-1]]
    assert resized and resized[0] == 1  # grown while the short request held its slot
    assert [a.token_ids for a in answers] == [a.token_ids for a in alone]


def test_an_idle_engine_gives_its_pool_back(pipe, monkeypatch):
    import chunkcache.engine
    from chunkcache.kvcache import KVPool

    monkeypatch.setattr(chunkcache.engine, "POOL_IDLE_S", 0.05)
    pools = []
    monkeypatch.setattr(chunkcache.engine, "KVPool", lambda *a: pools.append(KVPool(*a)) or pools[-1])
    pipe.query(QUESTIONS[0], documents=DOCS)
    assert pools, "the request's cache was no pool slot"
    deadline = time.monotonic() + 5
    while pipe.engine._pool is not None:
        assert time.monotonic() < deadline, "the idle engine kept its KV pool"
        time.sleep(0.01)


def test_a_request_the_pool_cannot_grow_to_is_served_once_the_pool_empties(tmp_path, tiny_lm, hash_embedder, pipe):
    """A short request sizes the pool; a long one fits the memory limit alone but neither beside the pool nor as
    a grown pool. It waits while the short one runs, then the emptied pool gives way (it once starved)."""
    from chunkcache.engine import _round_up
    from chunkcache.kvcache import pool_bytes_per_slot_token

    def staged(max_new):
        return pipe._plan(pipe._request(QUESTIONS[0], None, DOCS, "blend", None, max_new, 0.0, 1.0, 0, None, None))

    per_slot_token = pool_bytes_per_slot_token(tiny_lm)
    short_pool = 2 * _round_up(pipe.cache_tokens(staged(4)) * 5 // 4, 64) * per_slot_token
    prompt = staged(4).layout.num_tokens
    long_tokens = pipe.cache_tokens(staged(4)) * 4
    long_need = pipe.kv_bytes(staged(long_tokens - prompt))
    limit = short_pool + long_need // 2
    assert short_pool + long_need > limit >= long_need and 2 * long_tokens * per_slot_token > limit
    p = open_tiny_pipe(tmp_path / "tight", tiny_lm, hash_embedder, max_kv_bytes=limit, max_running=2)
    try:
        short = p.submit(QUESTIONS[0], documents=DOCS, max_new_tokens=4)
        long = p.submit(QUESTIONS[0], documents=DOCS, max_new_tokens=long_tokens - prompt)
        done = []
        reader = threading.Thread(target=lambda: done.extend([list(short)[-1], list(long)[-1]]), daemon=True)
        reader.start()
        reader.join(60)
        assert len(done) == 2 and all(a.text for a in done), "the long request never got its memory"
        wait_until_idle(p, 10, "the requests did not leave the engine")
    finally:
        p.close()
