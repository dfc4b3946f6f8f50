"""The engine seen from the event loop: a request's events as an async iterator, and admission."""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable

import anyio

from ..answer import Answer
from ..engine import Ticket


async def ticket_events(submit: Callable[[], Ticket], on_done: Callable[[], None] = lambda: None) -> AsyncIterator:
    """The events of the engine ticket that `submit()` returns, without blocking the event loop.

    `submit` runs in a worker thread (it validates and tokenizes). Then the engine thread hands each event
    straight to this loop (`Ticket.stream_to`): no thread waits on the stream. If the consumer stops early
    (client gone), the ticket is cancelled and the engine frees its slot at its next step. `on_done` runs
    once the stream is finished or closed (or `submit` failed).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    submitted: list[Ticket] = []

    def submit_and_keep() -> Ticket:
        submitted.append(submit())
        return submitted[0]

    try:
        ticket = await anyio.to_thread.run_sync(submit_and_keep)
    except BaseException:  # a failed submit, or this task cancelled (the thread may still have submitted)
        for orphan in submitted:
            orphan.cancel()
        on_done()
        raise

    def deliver(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            ticket.cancel()

    ticket.stream_to(deliver)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Answer):
                return
    finally:
        ticket.cancel()
        on_done()


class Admission:
    """At most `limit` requests admitted (waiting for or using the model) at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self._num_admitted = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self._num_admitted >= self.limit:
                return False
            self._num_admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            assert self._num_admitted > 0, "Admission.leave without try_enter"
            self._num_admitted -= 1

    @property
    def num_admitted(self) -> int:
        return self._num_admitted
