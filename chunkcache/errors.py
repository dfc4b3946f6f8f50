"""What a request can fail with, for callers to catch: each message says what went wrong and what to do."""
from __future__ import annotations


class QueryError(ValueError):
    """A request the pipeline cannot serve as asked; the message says why and what to change."""


class RequestCancelled(RuntimeError):
    """The caller's `cancelled()` said stop before the request reached the model (e.g. its client left)."""


class EngineBusy(RuntimeError):
    """The engine's queue is full (max_waiting); retry shortly (a server answers 503 with Retry-After)."""


class EngineClosed(RuntimeError):
    """The pipeline was closed while the request waited or ran."""
