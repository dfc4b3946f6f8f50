"""The FastAPI app: /query, OpenAI-compatible /v1/chat/completions and /v1/models, /healthz, /metrics.

The pipeline's engine batches every request in flight (chunkcache/engine.py); waiting on it is
blocking, so each request waits in a worker thread, never on the event loop.
"""
# NOTE: no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime
# and the request models are local classes built from the settings' limits.
import asyncio
import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from store import DiskFullError, StoreUnavailableError

from .. import __version__
from ..answer import Answer
from ..errors import EngineBusy, EngineClosed, QueryError, RequestCancelled
from .auth import Authenticator, Caller
from .bridge import Admission, ticket_events
from .metrics import Metrics, NoMetrics
from .middleware import BodyLimit, RequestId, RequestMetrics
from .openai_format import Completion, TextCompletion, embeddings, legacy_logprobs, logprobs as openai_logprobs
from .schemas import ErrorBody, request_models
from .settings import ServerSettings

log = logging.getLogger("chunkcache.server")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or unknown API key"},
    403: {"model": ErrorBody, "description": "the key is valid but not for this endpoint (/metrics: the admin key)"},
    413: {"model": ErrorBody, "description": "request body over the size limit"},
    422: {"model": ErrorBody, "description": "invalid request: the message says which field and why"},
    503: {"model": ErrorBody, "description": "the model is still loading, or the server is busy"},
}
# The endpoints that may store KV (a miss) can find the disk full.
QUERY_ERROR_RESPONSES = {**ERROR_RESPONSES, 507: {
    "model": ErrorBody, "description": "the server's disk is full and this request had to store new KV "
                                       "(requests over cached chunks still work)"}}
# Said to the client instead of the store's own message, which names server paths; that goes to the log.
DISK_FULL_MESSAGE = ("the server's disk is full: this request needs to store the KV of chunks that are not cached "
                     "yet, and cannot. Requests over cached chunks still work; retry later (the operator has to "
                     "free disk space or cap the store: `chunkcache gc`)")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.param = status, message, code, headers, param


@dataclass
class Service:
    """The app's mutable state: the pipeline once loaded, and whether loading failed."""

    pipeline: Any = None
    failed: bool = False
    owns_pipeline: bool = False

    def ready(self) -> Any:
        if self.pipeline is None:
            if self.failed:
                raise ApiError(503, "the model failed to load; see the server log", "model_failed")
            raise ApiError(503, "the model is loading; retry shortly", "model_loading", {"Retry-After": "5"})
        return self.pipeline


def create_app(pipeline, settings: ServerSettings | None = None, metrics: Metrics | NoMetrics | None = None
               ) -> FastAPI:
    """The HTTP app over one pipeline.

    Args:
        pipeline: a RAGPipeline (anything with its `query` and `submit`, which returns an engine
            `Ticket`), served at once; or a
            zero-argument callable that builds one, called at start-up (lifespan) in a worker thread
            while /healthz answers 503. A pipeline built here is closed at shutdown.
        settings: limits, API keys, tenancy (default: ServerSettings(), no authentication).
        metrics: where request and cache metrics go (default: a fresh `Metrics`; `NoMetrics()` for none).
    """
    settings = settings or ServerSettings()
    metrics = metrics if metrics is not None else Metrics()
    auth = Authenticator(settings)
    admission = Admission(settings.max_pending)
    models = request_models(settings.limits)
    QueryRequest, ChatCompletionRequest, CompletionRequest = models.query, models.chat, models.completion
    EmbeddingRequest, TokenizeRequest, DetokenizeRequest = models.embedding, models.tokenize, models.detokenize
    factory = None if hasattr(pipeline, "submit") else pipeline
    service = Service(pipeline=None if factory else pipeline, owns_pipeline=factory is not None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load(app, factory, service)) if factory else None
        try:
            yield
        finally:
            if loading is not None:
                loading.cancel()
            if service.owns_pipeline and service.pipeline is not None:
                await run_in_threadpool(_close, service.pipeline)

    # NOTE: with keys, the schema is served only to a key holder, and the interactive pages are off: a
    # browser loading /docs cannot send the bearer key its page would need to fetch the schema.
    docs_open = not settings.auth_enabled
    app = FastAPI(title="chunkcache", version=__version__, lifespan=lifespan,
                  openapi_url="/openapi.json" if docs_open else None, docs_url="/docs" if docs_open else None,
                  redoc_url="/redoc" if docs_open else None,
                  description="Retrieval-augmented answers from precomputed chunk KV caches "
                              "(CacheBlend-style selective recompute), with an OpenAI-compatible chat API.")
    app.state.service = service
    app.state.metrics = metrics
    app.state.on_load_failure = lambda: None
    # Each add wraps the ones before: metrics see every status, 413s from the body limit included;
    # CORS headers and the request id go on every response, errors included.
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(RequestId)
    _add_error_handlers(app)

    bearer = HTTPBearer(auto_error=False, description="an API key (when the server has keys configured)")

    def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        found = auth.caller(credentials.credentials if credentials else None)
        if found is None:
            raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer KEY`", "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})
        return found

    def ready_pipeline() -> Any:
        return service.ready()

    async def run_query(pipe, question: str, kwargs: dict, request: Request) -> Answer:
        _admit(admission)
        # A client that leaves cancels its request: the pipeline polls `gone` before it starts and between
        # decode steps, so the model goes to the next request instead of finishing an unread answer.
        gone = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            answer = await run_in_threadpool(_guarded, pipe.query, question, cancelled=gone.is_set, **kwargs)
        except RequestCancelled:
            metrics.observe_cancelled()
            raise
        finally:
            watcher.cancel()
            admission.leave()
        if answer.finish_reason == "cancelled":
            metrics.observe_cancelled()
        metrics.observe_answer(answer)
        return answer

    async def open_stream(pipe, question: str, kwargs: dict) -> AsyncIterator:
        """The events, with the first already produced, so a request the pipeline refuses is an HTTP
        error rather than an event inside a 200 stream."""
        _admit(admission)
        events = ticket_events(lambda: pipe.submit(question, **kwargs), on_done=admission.leave)
        try:
            first = await events.__anext__()
        except BaseException as exc:
            await events.aclose()
            _reraise(exc)
        return _prepend(first, events)

    @app.post("/query", response_model=Answer, responses={
        **QUERY_ERROR_RESPONSES, 200: {"description": "the answer; with stream=true, Server-Sent Events: `token` "
                                 "events ({\"text\"}) then one `answer` event (the same object as without stream)",
                                 "content": {"text/event-stream": {}}}})
    async def query(body: QueryRequest, request: Request, who: Caller = Depends(caller),
                    pipe=Depends(ready_pipeline)):
        """Answer a question over the store (or over `documents`), with sources, TTFT, timings and cache stats."""
        kwargs = {**body.pipeline_kwargs(), "namespace": auth.namespace(who)}
        if not body.stream:
            return await run_query(pipe, body.question, kwargs, request)
        events = await open_stream(pipe, body.question, kwargs)

        def render(event) -> list[str]:
            if isinstance(event, str):
                return [_sse("token", {"text": event})]
            metrics.observe_answer(event)
            return [_sse("answer", event.to_dict())]

        return StreamingResponse(_render_stream(events, render, lambda body: _sse("error", body),
                                                metrics.observe_cancelled),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions", responses={
        **QUERY_ERROR_RESPONSES, 200: {"description": "a `chat.completion`, or with stream=true "
                                       "`chat.completion.chunk` events ending with `data: [DONE]`",
                                       "content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request, who: Caller = Depends(caller),
                               pipe=Depends(ready_pipeline)):
        """OpenAI-compatible chat: the last message is the question; system messages make the request's own
        system prompt and earlier turns go after the chunks. Retrieval runs over the store unless `documents`
        is given (`top_k: 0`: off). `model`, when given, must be the served id (else 404, as OpenAI).
        `n` choices are decoded together. `usage.prompt_tokens_details.cached_tokens` counts reused KV."""
        served = _served(pipe, body.model)
        kwargs = {**body.pipeline_kwargs(), "namespace": auth.namespace(who)}
        top = (body.top_logprobs or 0) if body.logprobs else None
        completion = Completion(*served)
        if not body.stream:
            return completion.response(await run_choices(pipe, body.question(), kwargs, body.n or 1, request), top)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = await open_stream(pipe, body.question(), kwargs)

        def render(event) -> list[str]:
            if isinstance(event, str):
                return [_data(completion.chunk({"content": event}, include_usage=include_usage))]
            metrics.observe_answer(event)
            out = [_data(completion.chunk({}, event.finish_reason, openai_logprobs(event, top), include_usage))]
            if include_usage:
                out.append(_data(completion.usage_chunk(event)))
            return out + ["data: [DONE]\n\n"]

        async def sse():
            yield _data(completion.chunk({"role": "assistant", "content": ""}, include_usage=include_usage))
            async for text in _render_stream(events, render, _data, metrics.observe_cancelled):
                yield text

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)

    def _served(pipe, asked: str | None) -> tuple[str, str | None]:
        served = _model_identity(pipe, settings)
        if asked is not None and asked != served[0]:
            # Serving another model under the name asked for would be a silent wrong answer.
            raise ApiError(404, f"model {asked!r} not found; this server serves {served[0]!r} (GET /v1/models)",
                           "model_not_found", param="model")
        return served

    async def run_choices(pipe, question: str, kwargs: dict, n: int, request: Request) -> list[Answer]:
        """n choices: n requests the engine batches; seeded ones get seed, seed+1, ... (each reproducible)."""
        return list(await asyncio.gather(*(
            run_query(pipe, question, kwargs | ({"seed": kwargs["seed"] + i} if "seed" in kwargs else {}), request)
            for i in range(n))))

    @app.post("/v1/completions", responses={
        **QUERY_ERROR_RESPONSES, 200: {"description": "a `text_completion`, or with stream=true its chunks ending "
                                       "with `data: [DONE]`", "content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request, who: Caller = Depends(caller),
                          pipe=Depends(ready_pipeline)):
        """OpenAI's (legacy) completions: the prompt is the question, with the same extras as chat
        (`documents`, `top_k`, `mode`, ...), in the store's prompt template."""
        completion = TextCompletion(*_served(pipe, body.model))
        kwargs = {**body.pipeline_kwargs(), "namespace": auth.namespace(who)}
        if not body.stream:
            return completion.response(await run_choices(pipe, body.question(), kwargs, body.n or 1, request),
                                       body.logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = await open_stream(pipe, body.question(), kwargs)

        def render(event) -> list[str]:
            if isinstance(event, str):
                return [_data(completion.text_chunk(event, include_usage=include_usage))]
            metrics.observe_answer(event)
            out = [_data(completion.text_chunk("", event.finish_reason, legacy_logprobs(event, body.logprobs),
                                               include_usage))]
            if include_usage:
                out.append(_data(completion.usage_chunk(event)))
            return out + ["data: [DONE]\n\n"]

        return StreamingResponse(_render_stream(events, render, _data, metrics.observe_cancelled),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/embeddings", responses=QUERY_ERROR_RESPONSES)
    async def create_embeddings(body: EmbeddingRequest, who: Caller = Depends(caller), pipe=Depends(ready_pipeline)):
        """Embeddings from the store's own embedder (the space retrieval searches). `model` may be omitted,
        or name the embedder (as the store's config does, e.g. `default`) or the served model."""
        embedder = pipe.config.embedder
        if body.model not in (None, embedder, _model_identity(pipe, settings)[0]):
            raise ApiError(404, f"model {body.model!r} not found; embeddings come from {embedder!r}",
                           "model_not_found", param="model")
        texts = body.texts()
        def embed():  # tokenizing counts as blocking work too
            return pipe.embed(texts), sum(len(pipe.tokenize(t)) for t in texts)

        vectors, tokens = await run_in_threadpool(_guarded, embed)
        return embeddings(vectors, embedder, tokens, body.encoding_format)

    @app.post("/tokenize", responses=QUERY_ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest, who: Caller = Depends(caller), pipe=Depends(ready_pipeline)):
        """The model's token ids for `prompt`, as a question is tokenized (vLLM's shape)."""
        _served(pipe, body.model)
        tokens = await run_in_threadpool(_guarded, pipe.tokenize, body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": pipe.rt.lm.max_context}

    @app.post("/detokenize", responses=QUERY_ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest, who: Caller = Depends(caller), pipe=Depends(ready_pipeline)):
        _served(pipe, body.model)
        return {"prompt": await run_in_threadpool(_guarded, pipe.detokenize, body.tokens)}

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(who: Caller = Depends(caller), pipe=Depends(ready_pipeline)):
        """The one model this server answers with; a request naming another model gets a 404."""
        return {"object": "list", "data": [_model_card(pipe, settings)]}

    @app.get("/v1/models/{model}", responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}})
    async def get_model(model: str, who: Caller = Depends(caller), pipe=Depends(ready_pipeline)):
        card = _model_card(pipe, settings)
        if model != card["id"]:
            raise ApiError(404, f"model {model!r} not found; this server serves {card['id']!r}", "model_not_found")
        return card

    @app.get("/health", responses={503: {"description": "loading, or failed to load"}})
    @app.get("/healthz", responses={503: {"description": "loading, or failed to load"}})
    async def healthz():
        """200 once the model is loaded; 503 before (or if loading failed)."""
        if service.pipeline is not None:
            return {"status": "ok", "model": _model_identity(service.pipeline, settings)[0]}
        return JSONResponse({"status": "failed" if service.failed else "loading"}, status_code=503)

    @app.get("/version")
    async def version():
        """chunkcache's version (no key needed: it reveals nothing about the store or its tenants)."""
        return {"version": __version__}

    def admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not settings.metrics_need_admin:
            return
        token = credentials.credentials if credentials else None
        if auth.is_admin(token):
            return
        if settings.admin_key is None:
            raise ApiError(403, "/metrics shows every tenant's traffic and needs the admin key, which this server "
                           "does not have: start it with --admin-key (or CHUNKCACHE_ADMIN_KEY)", "admin_key_required")
        if token and auth.caller(token) is not None:
            raise ApiError(403, "this API key cannot read /metrics; send the admin key", "admin_key_required")
        raise ApiError(401, "missing or invalid admin key: send `Authorization: Bearer ADMIN_KEY`", "invalid_api_key",
                       {"WWW-Authenticate": "Bearer"})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}},
                                                              **ERROR_RESPONSES})
    async def get_metrics(_: None = Depends(admin)):
        """Prometheus text format. With keys configured, only the admin key reads it (unless public_metrics)."""
        counts = getattr(service.pipeline, "engine_counts", None)
        if counts is not None and counts() is not None:
            metrics.observe_engine(counts())
        return Response(metrics.render(), media_type=metrics.content_type)

    if not docs_open:
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_schema(who: Caller = Depends(caller)):
            """The schema, for key holders (the API's own auth)."""
            return JSONResponse(app.openapi())

    return app


async def _load(app: FastAPI, factory: Callable[[], Any], service: Service) -> None:
    try:
        # abandon_on_cancel: a shutdown during loading does not wait for the model to finish loading.
        service.pipeline = await anyio.to_thread.run_sync(factory, abandon_on_cancel=True)
        log.info("pipeline loaded; serving")
    except Exception:
        log.exception("loading the pipeline failed")
        service.failed = True
        app.state.on_load_failure()


def _close(pipe) -> None:
    pipe.close()  # RAGPipeline.close stops its engine, then waits for any direct call using the model


def _admit(admission: Admission) -> None:
    if not admission.try_enter():
        raise ApiError(503, f"the server is busy ({admission.limit} requests in progress); retry shortly",
                       "server_busy", {"Retry-After": "1"})


async def _watch_disconnect(request: Request, gone: threading.Event, every_s: float = 0.1) -> None:
    """Set `gone` once the client has disconnected (until cancelled when the request ends)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    log.info("client left %s; cancelling its request", request.url.path)
    gone.set()


def _guarded(fn, *args, **kwargs):
    """Run `fn` (in a worker thread); unexpected errors become `_server_error`'s answer."""
    try:
        return fn(*args, **kwargs)
    except (QueryError, RequestCancelled):
        raise
    except Exception as exc:
        raise _server_error(exc) from exc


def _reraise(exc: BaseException):
    if isinstance(exc, (QueryError, ApiError)) or not isinstance(exc, Exception):
        raise exc
    raise _server_error(exc) from exc


def _engine_refusal(exc: Exception) -> ApiError | None:
    """503s for a request the engine could not take: its queue is full, or the server is shutting down."""
    if isinstance(exc, EngineBusy):
        return ApiError(503, f"the server is busy: {exc}", "server_busy", {"Retry-After": "1"})
    if isinstance(exc, EngineClosed):
        return ApiError(503, "the server is shutting down; retry on another replica", "shutting_down")
    if isinstance(exc, StoreUnavailableError):  # only when nothing here could stand in for the shared store
        return ApiError(503, "the shared store is unreachable; retry shortly", "store_unavailable",
                        {"Retry-After": "5"})
    return None


def _server_error(exc: Exception) -> ApiError:
    """A failure the client did not cause, logged here: 503 when the engine refused it (busy, shutting
    down), 507 for a full disk (the operator's to fix, and requests that write nothing keep working, so
    it is not an outage), else a generic 500. Details stay in the log: they name server paths."""
    refusal = _engine_refusal(exc)
    if refusal is not None:
        log.warning("request refused: %s", exc)
        return refusal
    if isinstance(exc, DiskFullError):
        log.error("request failed: %s", exc)
        return ApiError(507, DISK_FULL_MESSAGE, "disk_full")
    log.error("request failed", exc_info=exc)
    return ApiError(500, "internal error; see the server log", "internal_error")


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def _render_stream(events: AsyncIterator, render: Callable[[Any], list[str]],
                         render_error: Callable[[dict], str], on_cancel: Callable[[], None]) -> AsyncIterator[str]:
    """The rendered events; a failure once the 200 has been sent becomes one error event (with the
    pipeline's message for a QueryError, `_server_error`'s otherwise). `on_cancel` runs if the stream is
    closed before its end: its client left."""
    ended = False
    try:
        async for event in events:
            for text in render(event):
                yield text
        ended = True
    except QueryError as exc:
        ended = True
        yield render_error(_error_body(str(exc), "query_error"))
    except Exception as exc:
        ended = True
        error = _server_error(exc)
        yield render_error(_error_body(error.message, error.code))
    finally:
        if not ended:
            on_cancel()
        await events.aclose()


def _model_identity(pipe, settings: ServerSettings) -> tuple[str, str | None]:
    lm = getattr(getattr(pipe, "rt", None), "lm", None)
    name = settings.model_name or (lm.spec if lm is not None else "chunkcache")
    return name, (lm.fingerprint if lm is not None else None)


def _model_card(pipe, settings: ServerSettings) -> dict:
    """OpenAI's model object, plus the context length under vLLM's name (clients such as LlamaIndex read
    it instead of guessing)."""
    card = {"id": _model_identity(pipe, settings)[0], "object": "model", "created": 0, "owned_by": "chunkcache"}
    lm = getattr(getattr(pipe, "rt", None), "lm", None)
    if lm is not None:
        card["max_model_len"] = lm.max_context
    return card


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _data(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error_body(message: str, code: str, param: str | None = None) -> dict:
    kind = "server_error" if code in ("internal_error", "disk_full") else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(_error_body(exc.message, exc.code, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError):
        return JSONResponse(_error_body(str(exc), "query_error"), 422)

    @app.exception_handler(RequestCancelled)
    async def cancelled(request: Request, exc: RequestCancelled):
        # Nobody reads this (the client left); 499, nginx's "client closed request", marks it in the metrics.
        return JSONResponse(_error_body(str(exc), "client_closed_request"), 499)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = [_plain_error(e) for e in exc.errors()]
        message = "; ".join(_describe(e) for e in errors) or "invalid request"
        param = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else None
        body = _error_body(message, "validation_error", param or None)
        return JSONResponse({**body, "detail": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(_error_body(str(exc.detail), f"http_{exc.status_code}"), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(_error_body("internal error; see the server log", "internal_error"), 500)


def _plain_error(error: dict) -> dict:
    """A validation error without pydantic's extras (its ctx may hold exception objects)."""
    if error.get("type") == "json_invalid":  # loc is ("body", character offset)
        reason = (error.get("ctx") or {}).get("error", "")
        return {"loc": ["body"], "msg": f"the body is not valid JSON: {reason} at character {error['loc'][-1]}",
                "type": "json_invalid"}
    return {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"][1:] if p != "body") if error["loc"][:1] == ["body"] else \
        ".".join(str(p) for p in error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
