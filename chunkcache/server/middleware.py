"""ASGI middleware: the request body size limit, per-request metrics and request ids."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from .metrics import Metrics, NoMetrics

ENDPOINTS = ("/query", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize",
             "/v1/models", "/healthz", "/health", "/version", "/metrics", "/docs", "/openapi.json")
REQUEST_ID_HEADER = b"x-request-id"
# A client's id is echoed only when it is short and plain: it goes into logs and a response header.
_CLIENT_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("chunkcache.server")


def endpoint_label(path: str) -> str:
    """A bounded label set: a known route, or "other" (so random paths cannot grow the metrics)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


async def send_error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a body over `max_bytes`: refused on Content-Length before reading, and counted while
    reading (chunked uploads and lying headers). The body is buffered and replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await send_error(send, 400, "the Content-Length header is not a number", "bad_request")
            if int(declared) > self.max_bytes:
                return await self._too_large(send, int(declared))
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left; let the app see it
                parts = None
                first = message
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(send, size)
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(parts), "more_body": False}
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, size: int) -> None:
        await send_error(send, 413, f"the request body is {size} bytes or more; the limit is {self.max_bytes} bytes",
                         "request_too_large", [(b"connection", b"close")])


class RequestMetrics:
    """Counts every request by endpoint and status, and its latency to the last byte sent."""

    def __init__(self, app, metrics: Metrics | NoMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before responding

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.observe_request(endpoint_label(scope["path"]), status, time.perf_counter() - started)


class RequestId:
    """Every response carries `X-Request-Id`: the client's own (if short and plain) or a new one. It is
    logged with the request's method, path, status and latency, so a client's report finds its line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER)
        request_id = given if given is not None and _CLIENT_ID.match(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": headers + [(REQUEST_ID_HEADER, request_id)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("request %s %s %s -> %d in %.3f s", request_id.decode(), scope.get("method", "?"),
                     scope["path"], status, time.perf_counter() - started)
