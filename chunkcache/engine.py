"""The engine: one loop that owns the model and serves every request in batched steps.

Continuous batching in the Orca/vLLM sense, kept as simple as a CPU allows. Requests queue; each
step of the loop
  1. admits waiting requests, first come first served, while the limits allow: at most `max_running`
     admitted at once, at most `max_prefilling` of them still prefilling, and their KV caches within
     `max_kv_bytes` (a request that does not fit waits for memory rather than
     exhausting it). A cache is a slot of the engine's KV pool (chunkcache/kvcache.py), so that the
     decode steps attend in one call per layer. Admission retrieves, lays the prompt out and places
     the cached chunk KVs; the probe selection's reuse passes of the new requests then run as one
     batch (one request, with one prefill at a time);
  2. runs one flattened forward (`forward_batch`): the next token of every decoding request, plus
     prefill pieces of the admitted ones, up to `max_batched_tokens` rows in all. A long prefill
     is split over several steps (chunked prefill) so that it does not freeze everyone's decode;
     splitting is exact, since each row attends to the rows at or before its position and earlier
     pieces are complete in every layer. (A check-layer selection cannot be split: it needs all of
     its candidates at the check layer, so it runs whole, alone, in its step.)
  3. hands each request's logits to its `Generation`, which samples and detokenises; finished
     requests leave and free their memory.

Consumers read a `Ticket`: a queue the loop puts events on. The loop never waits on a consumer, so a
slow reader only delays itself, and a consumer that stops reading (client gone) cancels its ticket,
which frees the slot at the next step. The loop holds the runtime's lock during a step only, so
ingest and the benchmark's direct calls interleave between steps.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .answer import Answer
from .errors import EngineBusy, EngineClosed, QueryError, RequestCancelled
from .forward import forward_batch, forward_tokens
from .generation import Generation
from .kvcache import KVCache, KVPool, new_cache, pool_bytes_per_slot_token
from .openmp import untuned_warning

log = logging.getLogger(__name__)
# Engines still running, stopped at interpreter exit: a loop thread left in its wait while the
# interpreter finalises made the process abort ("terminate called without an active exception",
# SIGABRT) whenever a script ended without closing its pipeline.
_running: weakref.WeakSet = weakref.WeakSet()
# An empty KV pool is kept this long, so that back-to-back requests do not pay for fresh memory (its page
# faults, ~100 ms for 8 slots of ~900 rows) each time; an idle engine then holds no KV memory.
POOL_IDLE_S = 2.0


@atexit.register
def _close_running_engines() -> None:
    for engine in list(_running):
        try:
            engine.close()
        except Exception:  # one engine's failure must not leave the others running into finalisation
            log.exception("closing the engine at exit failed")



@dataclass(frozen=True)
class EngineLimits:
    max_running: int  # requests admitted at once (prefilling or decoding); 1 = one at a time
    max_batched_tokens: int  # rows in one step's forward: decode tokens plus prefill pieces
    max_waiting: int  # queued requests beyond which `submit` raises EngineBusy
    max_kv_bytes: int  # memory for the admitted requests' KV caches
    # admitted requests still prefilling (None: max_running). A request is admitted when it can start its
    # prefill, so on a compute-bound device 1 gives first tokens in arrival order instead of a whole wave's
    # at once: the same work, earlier first tokens (docs/SERVER.md).
    max_prefilling: int | None = None

    def __post_init__(self) -> None:
        if self.max_prefilling is None:
            object.__setattr__(self, "max_prefilling", self.max_running)
        if self.max_running < 1 or self.max_waiting < 0 or self.max_kv_bytes < 1 or self.max_prefilling < 1:
            raise ValueError(f"engine limits must be positive: {self}")
        if self.max_batched_tokens < self.max_running:
            raise ValueError(f"max_batched_tokens ({self.max_batched_tokens}) must be at least max_running "
                             f"({self.max_running}): every running request decodes one token per step")


def default_prefilling(max_running: int, device: torch.device) -> int:
    """Requests prefilling at once: 1 on CPU, where a batch of prefills costs the sum of its members, so one
    after another gives earlier first tokens for the same work; max_running on a GPU, where a batch costs
    little more than one."""
    return max_running if device.type == "cuda" else 1


def default_kv_bytes(device: torch.device) -> int:
    """A quarter of the device's memory (of the machine's RAM on CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class Ticket:
    """One submitted request as its consumer sees it: iterate for text pieces, then the Answer."""

    def __init__(self, req):
        self.req = req
        self.submitted = time.perf_counter()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._sink: Callable[[object], None] | None = None
        self._sink_lock = threading.Lock()

    def __iter__(self) -> Iterator[str | Answer]:
        while True:
            item = self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Answer):
                return

    def cancel(self) -> None:
        """The consumer has gone: the engine drops the request at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set() or (self.req.cancelled is not None and self.req.cancelled())

    def stream_to(self, sink: Callable[[object], None]) -> None:
        """Hand every event (those already queued first, in order) to `sink` instead of the iterator. The engine
        thread calls `sink`, so it must only hand the item over (an event loop's call_soon_threadsafe): a
        server then needs no thread per stream, waking for every token and taking the GIL from the engine."""
        with self._sink_lock:
            while True:
                try:
                    sink(self._events.get_nowait())
                except queue.Empty:
                    break
            self._sink = sink

    def put(self, item) -> None:
        with self._sink_lock:
            if self._sink is None:
                self._events.put(item)
                return
        self._sink(item)  # only the engine thread puts, so the items keep their order


@dataclass
class _Active:
    """An admitted request: prefilling (`todo` rows left) or decoding (`gen` set)."""

    ticket: Ticket
    staged: object  # pipeline.Staged
    cache: KVCache
    kv_bytes: int  # of a cache of its own (0 for a pool slot: the pool is counted whole)
    todo: torch.Tensor | None = None  # prompt positions still to compute, in increasing order
    prefill_started: float = 0.0
    gen: Generation | None = None
    done_rows: list[torch.Tensor] = field(default_factory=list)


@dataclass
class EngineCounts:
    running: int  # admitted: prefilling or decoding
    waiting: int
    kv_bytes: int  # the admitted requests' KV caches (their pool slots and caches of their own)
    kv_allocated_bytes: int  # KV memory allocated: the whole pool (free slots too) and the caches of their own
    steps: int  # forwards run so far
    peak_batch: int  # the most requests one forward has served


class Engine:
    """The loop that owns the model (see the module docstring). `pipeline` supplies the request work:
    `_plan`, `kv_bytes`, `_place_kv`, `_choose_positions`, `_prepared`, `_generation`."""

    def __init__(self, pipeline, limits: EngineLimits):
        self.pipe = pipeline
        self.limits = limits
        self._waiting: deque[Ticket] = deque()
        self._planned: dict[int, object] = {}  # id(ticket) -> its Staged, planned while it waits for memory
        self._active: list[_Active] = []
        self._pool: KVPool | None = None  # the running requests' caches, as slots (chunkcache/kvcache.py)
        self._private_bytes = 0  # caches of their own, for requests the pool could not grow to
        self._steps = self._peak_batch = 0
        self._cv = threading.Condition()
        self._closed = False
        warning = untuned_warning()
        if warning and pipeline.rt.lm.device.type == "cpu" and torch.get_num_threads() > 1:
            log.warning(warning)
        self._thread = threading.Thread(target=self._loop, name="chunkcache-engine", daemon=True)
        self._thread.start()
        _running.add(self)

    # -- the consumers' side ---------------------------------------------------------------------
    def submit(self, req) -> Ticket:
        ticket = Ticket(req)
        with self._cv:
            if self._closed:
                raise EngineClosed("the pipeline is closed")
            if len(self._waiting) >= self.limits.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting (max_waiting="
                                 f"{self.limits.max_waiting}); retry shortly")
            self._waiting.append(ticket)
            self._cv.notify()
        return ticket

    def run(self, req) -> Iterator[str | Answer]:
        """Submit `req` and yield its events; stopping early (closing this generator) cancels it."""
        ticket = self.submit(req)
        try:
            yield from ticket
        finally:
            ticket.cancel()

    def counts(self) -> EngineCounts:
        with self._cv:
            return EngineCounts(len(self._active), len(self._waiting), self._kv_held(), self._kv_in_use(), self._steps,
                                self._peak_batch)

    def close(self) -> None:
        """Stop the loop after its current step; requests still queued or running get EngineClosed."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        _running.discard(self)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active:
                    if not self._cv.wait(timeout=POOL_IDLE_S if self._pool is not None else None):
                        self._pool = None  # idle a while: the KV memory goes back
                if self._closed:
                    break
            try:
                with self.pipe.rt.lock, torch.inference_mode():
                    self._step()
            except Exception as exc:  # a defect in the loop itself: fail what is in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                failed = list(self._active)
                self._release(failed)
                for active in failed:
                    active.ticket.put(exc)
        closed = EngineClosed("the pipeline was closed before this request finished")
        with self._cv:
            for ticket in self._waiting:
                ticket.put(closed)
            self._waiting.clear()
        running = list(self._active)
        self._release(running)
        self._pool = None
        for active in running:
            active.ticket.put(closed)

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        decoding = [a for a in self._active if a.gen is not None]
        prefilling = [a for a in self._active if a.gen is None]
        batch: list[tuple[_Active, torch.Tensor, torch.Tensor]] = []  # (request, token ids, positions) this step
        for active in decoding:
            token, position = active.gen.next_input()
            batch.append((active, torch.tensor([token]), torch.tensor([position])))
        budget = self.limits.max_batched_tokens - len(batch)
        for active in prefilling:
            if active.staged.selector is not None:  # a check-layer selection runs whole, alone
                self._prefill_whole(active)
                continue
            if budget <= 0:
                continue
            piece, active.todo = active.todo[:budget], active.todo[budget:]
            budget -= len(piece)
            batch.append((active, active.staged.prompt_ids[piece], piece))
        if batch:
            self._forward(batch)

    def _drop_cancelled(self) -> None:
        with self._cv:
            for ticket in [t for t in self._waiting if t.cancelled]:
                self._waiting.remove(ticket)
                self._planned.pop(id(ticket), None)
                ticket.put(_cancelled_error())
        for active in [a for a in self._active if a.ticket.cancelled]:
            if active.gen is not None:
                active.gen.cancel()
                self._finish(active)
            else:
                self._release([active])
                active.ticket.put(_cancelled_error())

    def _admit(self) -> None:
        """Admit waiting requests, in order, while the limits allow; then choose the probe selections'
        rows for the new ones in one batched pass."""
        limits, new = self.limits, []
        # (the new ones are in _active already, prefilling)
        while (len(self._active) < limits.max_running
               and sum(a.gen is None for a in self._active) < limits.max_prefilling):
            with self._cv:
                if not self._waiting:
                    break
                ticket = self._waiting[0]
            staged = self._planned.get(id(ticket))
            try:
                if staged is None:
                    staged = self._planned[id(ticket)] = self.pipe._plan(ticket.req)
                need = self.pipe.kv_bytes(staged)
                if need > limits.max_kv_bytes:
                    raise _too_big(need, limits.max_kv_bytes)
                cache = self._allocate(staged, need)
                if cache is None:
                    break  # it waits, in order, for running requests to free memory
                self._pop(ticket)
                staged.timings.queue_s = time.perf_counter() - ticket.submitted
                staged.started = ticket.submitted  # the caller's TTFT and total include the time queued
                active = _Active(ticket, staged, cache, 0 if cache.pool is not None else need)
                self._private_bytes += active.kv_bytes
                self._active.append(active)
                self.pipe._place_kv(staged, cache)
                active.prefill_started = time.perf_counter()
            except Exception as exc:  # this request's own failure (bad input, store error): only it fails
                self._pop(ticket)
                self._release([a for a in self._active if a.ticket is ticket])
                ticket.put(exc)
                continue
            new.append(active)
        probes = [a for a in new if a.staged.positions is None]
        if probes:
            self._isolated(probes, lambda group: self.pipe._choose_positions([a.staged for a in group])
                           or [None] * len(group))
        for active in new:
            if active in self._active:
                active.todo = active.staged.positions

    def _allocate(self, staged, need: int) -> KVCache | None:
        """The request's cache: a slot of the pool, which grows (by a quarter more than asked, so that the
        next slightly longer prompt fits too) while memory allows; else a cache of its own; else None (it waits).
        The pool has a slot per running request, so a free one is there whenever admission is."""
        lm, limit = self.pipe.rt.lm, self.limits.max_kv_bytes
        tokens = self.pipe.cache_tokens(staged)
        prompt = staged.layout.num_tokens
        if self._pool is not None and self._pool.has_room(tokens):
            return self._pool.take(tokens, prompt)
        # An empty pool too small for this request is replaced rather than resized: nothing to copy.
        pool = self._pool if self._pool is not None and self._pool.in_use else None
        per_slot_token = pool_bytes_per_slot_token(lm)
        slots = self.limits.max_running
        held = pool.nbytes if pool is not None else 0  # a resize holds the old pool until it has copied it
        for capacity in (_round_up(tokens * 5 // 4, 64), tokens):
            capacity = max(capacity, pool.capacity if pool is not None else 0)
            if self._private_bytes + held + slots * capacity * per_slot_token <= limit:
                if pool is None:
                    self._pool = None  # (an empty one goes first, so that the two are never held together)
                self._pool = KVPool(lm, slots, capacity) if pool is None else pool.resized(lm, capacity)
                return self._pool.take(tokens, prompt)
        if self._kv_in_use() + need > limit and self._pool is not None and not self._pool.in_use:
            self._pool = None  # an empty pool must not starve a request that fits alone
        if self._kv_in_use() + need <= limit:
            return new_cache(lm, tokens)
        return None

    def _kv_in_use(self) -> int:
        """The KV memory allocated: the pool whole (free slots too) and the caches of their own."""
        pool = self._pool  # read once: counts() calls this from other threads
        return self._private_bytes + (pool.nbytes if pool is not None else 0)

    def _kv_held(self) -> int:
        """The KV memory the admitted requests hold: their slots and their caches of their own."""
        pool = self._pool
        return self._private_bytes + (pool.in_use * pool.nbytes // pool.slots if pool is not None else 0)

    def _pop(self, ticket: Ticket) -> None:
        with self._cv:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
        self._planned.pop(id(ticket), None)

    def _prefill_whole(self, active: _Active) -> None:
        staged = active.staged

        def compute(_group):
            result = forward_tokens(self.pipe.rt.lm, staged.cache, staged.prompt_ids[staged.positions],
                                    staged.positions, narrow_at=staged.narrow_at, selector=staged.selector)
            return [(result.kept_positions, result.logits)]

        for _, (kept, logits) in self._isolated([active], compute):
            self._dispatch(active, lambda: self._prefilled(active, kept, logits))

    def _forward(self, batch: list[tuple[_Active, torch.Tensor, torch.Tensor]]) -> None:
        def compute(group: list[tuple[_Active, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
            logits, _ = forward_batch(self.pipe.rt.lm, [(a.staged.cache, ids, positions) for a, ids, positions in group])
            return list(logits)

        self._steps += 1
        self._peak_batch = max(self._peak_batch, len(batch))
        for (active, _, positions), row in self._isolated(batch, compute):
            if active.gen is not None:
                self._dispatch(active, lambda: self._emit(active, active.gen.feed(row)))
            else:
                active.done_rows.append(positions)
                if len(active.todo) == 0:
                    self._dispatch(active, lambda: self._prefilled(active, torch.cat(active.done_rows), row))

    def _isolated(self, group: list, compute) -> list[tuple]:
        """[(member, its result)] of compute(group) (a list, one result per member); if the pass raises, each
        member runs alone, so that only the failing requests fail (and leave the list). Rerunning is safe:
        a pass writes only its own rows, at their positions."""
        try:
            return list(zip(group, compute(group)))
        except Exception as exc:
            if len(group) == 1:
                self._fail(group[0], exc)
                return []
        done = []
        for member in group:
            try:
                done.extend(zip([member], compute([member])))
            except Exception as exc:
                self._fail(member, exc)
        return done

    def _dispatch(self, active: _Active, handle) -> None:
        """handle(): sampling, detokenising, figures for one request; its failure fails only that request."""
        try:
            handle()
        except Exception as exc:
            self._fail(active, exc)

    def _fail(self, member, exc: Exception) -> None:
        active = member[0] if isinstance(member, tuple) else member
        log.warning("request failed in the engine: %s", exc)
        self._release([active])
        active.ticket.put(exc)

    def _prefilled(self, active: _Active, kept_positions: torch.Tensor, logits: torch.Tensor) -> None:
        """The prompt is complete: the request starts decoding with its first token."""
        active.staged.timings.prefill_s = time.perf_counter() - active.prefill_started
        prepared = self.pipe._prepared(active.staged, kept_positions, logits)
        active.gen = self.pipe._generation(active.ticket.req, prepared)
        self._emit(active, active.gen.feed(logits))

    def _emit(self, active: _Active, pieces: list[str]) -> None:
        for piece in pieces:
            active.ticket.put(piece)
        if active.gen.done:
            self._finish(active)

    def _finish(self, active: _Active) -> None:
        rest, answer = active.gen.answer()
        for piece in rest:
            active.ticket.put(piece)
        self._release([active])  # first: a caller holding its answer finds the engine's memory freed
        active.ticket.put(answer)

    def _release(self, finished: list[_Active]) -> None:
        for active in finished:
            if active in self._active:
                self._private_bytes -= active.kv_bytes
                active.staged.cache = None  # the memory goes back now, not when the consumer lets go
                if active.cache.pool is not None:
                    try:
                        active.cache.pool.release(active.cache)
                    except ValueError:  # a defect; the slot is lost, the loop and the other requests go on
                        log.exception("releasing a request's KV slot failed")
                self._active.remove(active)  # last: counts() never sees a finished request's memory as held


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _cancelled_error() -> Exception:
    return RequestCancelled("the request was cancelled before it reached the model")


def _too_big(need: int, limit: int) -> Exception:
    return QueryError(f"this request's KV cache needs {need / 2**30:.2f} GiB but the engine's limit is "
                      f"{limit / 2**30:.2f} GiB (max_kv_bytes); lower top_k or max_new_tokens, or raise max_kv_bytes")
