"""Blocking model work seen from the event loop: a generator run in one worker thread, and admission."""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(make: Callable[[], Iterator[T]], on_done: Callable[[], None] = lambda: None
                            ) -> AsyncIterator[T]:
    """Yield the items of the blocking generator `make()` without blocking the event loop.

    The generator only waits on its engine ticket; no lock is held across its yields. If the consumer
    stops early (client gone), the thread closes the generator at its next item, which cancels the
    request: the engine frees its slot at its next step.
    `on_done` runs in that thread once the generator is finished or closed.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item, error=None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def produce() -> None:
        try:
            gen = make()
            try:
                for item in gen:
                    if stop.is_set():
                        break
                    put(item)
            finally:
                gen.close()
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_END, exc)
        else:
            put(_END)
        finally:
            on_done()

    threading.Thread(target=produce, name="chunkcache-stream", daemon=True).start()
    try:
        while True:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


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
