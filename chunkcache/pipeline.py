"""`RAGPipeline`: retrieve, load cached chunk KVs, blend, decode.

    pipe = RAGPipeline.open("stores/demo")
    answer = pipe.query("What does the with statement do?")
    print(answer.text, answer.ttft_s, answer.stats)
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from store import CorruptEntryError, StoreError, StoreUnavailableError

from .accounting import cached_token_count, kv_bytes_per_token, kv_entry_bytes
from .answer import Answer, CacheStats, Source, Timings
from .blend import PromptLayout, blend_selector, chunk_key_bias, initial_positions, prior_positions
from .calibration import load_blend_log_scale, load_chunk_log_scale, load_context_log_scale
from .config import MODES, ChunkCacheConfig, check_ratio
from .context import enriched
from .distributed import RayOptions
from .engine import Engine, EngineLimits, Ticket, default_kv_bytes, default_prefilling
from .openmp import in_passing_thread
from .errors import QueryError, RequestCancelled  # noqa: F401  (part of this module's API)
from .forward import forward_batch, forward_tokens
from .kvcache import KVCache, new_cache
from .ingest import Chunker, IngestReport, PendingChunk, ensure_prefix, ingest_paths, ingest_texts, store_chunks
from .kvcompute import chunk_kv, dense_kv, extract_kv, prefix_cache
from .generation import Generation
from .prompt import ConversationError, PromptTemplate, chunk_token_ids, suffix_token_ids
from .rope import rerotate_layers
from .runtime import Runtime
from .tokens import encode_plain
from .sampling import logits_processors

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
MAX_DOCUMENTS = 64


@dataclass
class ChunkRef:
    key: bytes
    token_ids: list[int]
    text: str
    source: str
    score: float | None
    # Text that came with the request (`documents`): keyed under the caller's namespace, quota'd.
    from_request: bool = False


@dataclass
class Request:
    question: str
    top_k: int
    documents: list[tuple[str, str | None]] | None  # (text, source); source None: "documents[i]"
    mode: str
    recompute_ratio: float
    max_new_tokens: int
    temperature: float
    top_p: float
    logprobs: int
    seed: int | None
    namespace: str
    check_layer: int
    deviation: str
    selection: str
    top_k_explicit: bool = True
    chunk_scale: float | str = "calibrated"
    scale_queries: str = "question"
    system_prompt: str | None = None  # the request's own system prompt (None: the store's)
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, text) turns, after the chunks
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in it)
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    selection_scores: torch.Tensor | None = None  # benchmark oracles only (see `evaluate`)
    plain_entries: bool = False  # benchmarks only: place plain entries where context-enriched ones are linked
    cancelled: Callable[[], bool] | None = None  # polled between decode steps: True stops the request


@dataclass
class Staged:
    """A request on its way to the model: laid out (`_plan`), then its cached KV placed (`_place_kv`)."""

    req: Request
    chunks: list[ChunkRef]
    layout: PromptLayout
    prompt_ids: torch.Tensor  # int64 [N]
    stats: CacheStats
    timings: Timings
    started: float
    cache: KVCache | None = None
    read: tuple[bool, list[bool]] = (True, [])  # whether the prefix's and each chunk's KV came from the store
    sources: list[Source] = field(default_factory=list)
    template: PromptTemplate | None = None  # the store's, or the one under the request's own system prompt
    positions: torch.Tensor | None = None  # rows computed from layer 0; None until the probe pass chose them
    narrow_at: int | None = None  # a check-layer selection narrows to `selector`'s rows after this layer
    selector: Callable | None = None


@dataclass
class Prepared:
    """A prompt whose KV cache is ready up to its last token, and the first-token logits."""

    cache: KVCache
    prompt_ids: torch.Tensor  # int64 [N]
    layout: PromptLayout
    sources: list[Source]
    stats: CacheStats
    timings: Timings
    logits: torch.Tensor  # fp32 [vocab] for the first answer token
    started: float


class RAGPipeline:
    """Chunk-cached retrieval-augmented generation over one store. Requests from any number of threads
    are served together by one engine (chunkcache/engine.py), which batches their prefill and decode."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The loop that runs the model for `events`, `query`, `stream` and `query_many` (started on first use)."""
        with self._engine_lock:
            if self._engine is None:
                cfg = self.config
                device = self.rt.lm.device
                prefilling = cfg.max_prefilling or default_prefilling(cfg.max_running, device)
                self._engine = Engine(self, EngineLimits(cfg.max_running, cfg.max_batched_tokens, cfg.max_waiting,
                                                         cfg.max_kv_bytes or default_kv_bytes(device), prefilling))
            return self._engine

    def stop_engine(self) -> None:
        """Stop the engine's thread (requests still in it get EngineClosed) and keep the store open; the next
        request starts a new one. Its exit takes its OpenMP team along, which matters where several engines
        share one process, as the benchmarks' servers do (chunkcache/openmp.py)."""
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def engine_counts(self):
        """The engine's counts (chunkcache.engine.EngineCounts), or None before it has started (this does
        not start it, unlike `engine`)."""
        engine = self._engine
        return None if engine is None else engine.counts()

    @classmethod
    def open(cls, store_dir, *, config: ChunkCacheConfig | None = None, lm=None, embedder=None,
             **overrides) -> "RAGPipeline":
        """Open the store made by `chunkcache ingest` (or create an empty one) with the models it was
        built with; overrides are ChunkCacheConfig fields (mode, recompute_ratio, top_k, device, ...)."""
        return cls(Runtime.open(store_dir, config, lm=lm, embedder=embedder, **overrides))

    @property
    def config(self) -> ChunkCacheConfig:
        return self.rt.config

    def retrieve(self, question: str, *, top_k: int | None = None) -> list[Source]:
        """The store's top_k chunks for `question`, best first, without running the model (for frameworks'
        retrievers); `hit` says whether the chunk's KV is stored."""
        req = self._request(question, top_k, None, None, None, None, 0.0, 1.0, 0, None, None)

        def find():
            with self.rt.lock:
                chunks = self._retrieve(req) if req.top_k else []
                return chunks, set(self.rt.store.kv.missing([c.key for c in chunks]))

        # Embedding the question runs torch: on a passing thread, so that the caller's (a server's worker
        # thread, say) keeps no OpenMP team beside the engine's (chunkcache/openmp.py).
        chunks, missing = in_passing_thread(find)
        return [Source(c.text, c.source, c.score, c.key.hex(), c.key not in missing) for c in chunks]

    def prompt_ids(self, question: str, **kwargs) -> list[int]:
        """The token ids of the whole prompt this request would run (prefix, chunks, suffix), without running
        the model: to hand the identical prompt to another engine (bench/peer.py). Keyword arguments as for
        `query` (documents, top_k, system_prompt, history)."""
        req = self._request(question, kwargs.pop("top_k", None), kwargs.pop("documents", None), "full", None,
                            kwargs.pop("max_new_tokens", None), 0.0, 1.0, 0, None, kwargs.pop("namespace", None),
                            **kwargs)
        with self.rt.lock:
            return self._plan(req).prompt_ids.tolist()

    def tokenize(self, text: str) -> list[int]:
        """The model's token ids for `text`, as a question is tokenized (special-token strings stay text)."""
        return encode_plain(self.rt.lm.tokenizer, text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        vocab = len(self.rt.lm.tokenizer)
        bad = [t for t in token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise QueryError(f"token ids {bad[:5]} are not in the vocabulary (0 to {vocab - 1})")
        return self.rt.lm.tokenizer.decode(list(token_ids))

    def embed(self, texts: Sequence[str]):
        """Unit-norm float32 embeddings [len(texts), dim] from the store's embedder (the retrieval space)."""
        def encode():
            with self.rt.lock:  # the embedder is shared with ingest and retrieval
                return self.rt.embedder.encode(list(texts))

        return in_passing_thread(encode)  # as in `retrieve`: no OpenMP team left on the caller's thread

    def __enter__(self) -> "RAGPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ingest(self, paths, *, progress: bool = True, chunker: Chunker | None = None,
               ray: RayOptions | None = None) -> IngestReport:
        """Ingest files and directories (see `chunkcache ingest`). `chunker(text) -> [chunk texts]` replaces
        the built-in splitter (paragraphs and sentences packed to `chunk_tokens`). `ray` computes the chunks
        on Ray workers writing to the shared store (chunkcache/distributed.py)."""
        paths = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else paths
        return ingest_paths(self.rt, paths, progress=progress, chunker=chunker, ray=ray)

    def ingest_texts(self, items, *, progress: bool = True, chunker: Chunker | None = None,
                     ray: RayOptions | None = None) -> IngestReport:
        """Ingest raw texts: strings, or dicts with "text" and optional "source" and "title". Re-ingesting an
        unchanged source is skipped; `chunker` and `ray` as for `ingest`."""
        return ingest_texts(self.rt, items, progress=progress, chunker=chunker, ray=ray)

    def query(self, question: str, **kwargs) -> Answer:
        """Answer `question`. Keyword arguments: top_k, documents, mode, recompute_ratio, max_new_tokens,
        temperature, top_p, logprobs, seed, namespace (see `events`)."""
        for event in self.events(question, **kwargs):
            if isinstance(event, Answer):
                return event
        raise AssertionError("events() ended without an Answer")

    def query_many(self, questions: Sequence[str], **kwargs) -> list[Answer]:
        """Answer several questions at once, in order; the engine batches them (keyword arguments as for
        `query`, the same for every question). The first failure is raised and the others are cancelled."""
        tickets = []
        try:
            for question in questions:
                tickets.append(self.submit(question, **kwargs))
            return [[e for e in ticket if isinstance(e, Answer)][0] for ticket in tickets]
        finally:
            for ticket in tickets:
                ticket.cancel()  # a no-op for the finished ones

    def stream(self, question: str, **kwargs) -> Iterator[str]:
        """The answer's text, piece by piece as it is decoded."""
        for event in self.events(question, **kwargs):
            if isinstance(event, str):
                yield event

    def events(self, question: str, *, top_k: int | None = None, documents: Sequence[str] | None = None,
               mode: str | None = None, recompute_ratio: float | None = None, max_new_tokens: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, logprobs: int = 0, seed: int | None = None,
               namespace: str | None = None, check_layer: int | None = None, deviation: str | None = None,
               selection: str | None = None, chunk_scale: float | str | None = None,
               scale_queries: str | None = None, system_prompt: str | None = None,
               history: Sequence | None = None, stop: str | Sequence[str] | None = None,
               repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
               logit_bias: dict[int, float] | None = None, cancelled: Callable[[], bool] | None = None
               ) -> Iterator[str | Answer]:
        """Text pieces as they are decoded, then the final `Answer`.

        Args:
            question: the user's question (non-empty).
            top_k: chunks to retrieve (default from config); ignored with `documents`. 0 turns retrieval
                off: the prompt holds no store chunks (for callers that put their context in the question).
            documents: use these texts as the chunks, in order, instead of retrieval; their KVs are
                computed on a miss, stored and reused by later calls.
            mode: "full", "reuse", "blend" (default) or "epic".
            recompute_ratio: blend's share of chunk tokens to recompute, in [0, 1].
            max_new_tokens, temperature (0 = greedy), top_p, seed: decoding.
            logprobs: return the top-`logprobs` log-probabilities of each generated token (0-20).
            namespace: tenant salt for chunk keys (default from config).
            check_layer, deviation ("key"/"value"), selection ("deviation"/"query"/"hybrid"): blend
                settings for this request (default from config).
            chunk_scale ("calibrated", "off" or S), scale_queries ("all"/"question"): the attention
                scale on reused chunks (default from config).
            system_prompt: this request's own system prompt instead of the store's. Its prefix KV is
                computed (then kept in memory, per namespace); no chunk is then exact where it sits, so
                blend may recompute tokens of the first chunk too.
            history: earlier turns, [{"role": "user"|"assistant", "content": text}, ...] opening with a user
                turn; they go after the chunks, in the model's chat template, before the question.
            stop: up to 4 strings that end the answer (finish_reason "stop"); the text stops before them.
            repetition_penalty (transformers' multiplicative one, over prompt and answer; 1 = off),
                frequency_penalty and presence_penalty (OpenAI's, over the answer, in [-2, 2]),
                logit_bias ({token id: bias in [-100, 100]}): through transformers' logits processors.
            cancelled: polled once the model is free and between decode steps; when it returns True the
                request stops: before it starts, RequestCancelled; while decoding, an Answer with what
                was decoded and finish_reason "cancelled" (a server passes "the client has left").
        """
        ticket = self.submit(question, top_k=top_k, documents=documents, mode=mode, recompute_ratio=recompute_ratio,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, logprobs=logprobs,
                             seed=seed, namespace=namespace, check_layer=check_layer, deviation=deviation,
                             selection=selection, chunk_scale=chunk_scale, scale_queries=scale_queries,
                             system_prompt=system_prompt, history=history, stop=stop,
                             repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty, logit_bias=logit_bias, cancelled=cancelled)
        try:
            yield from ticket
        finally:
            ticket.cancel()  # the caller stopped reading: free its slot at the engine's next step

    def submit(self, question: str, *, top_k=None, documents=None, mode=None, recompute_ratio=None,
               max_new_tokens=None, temperature=0.0, top_p=1.0, logprobs=0, seed=None, namespace=None,
               check_layer=None, deviation=None, selection=None, cancelled=None, **options) -> Ticket:
        """Queue `question` for the engine and return its ticket at once (arguments as for `events`).
        Iterating the ticket gives the text pieces, then the Answer; `ticket.cancel()` drops it. Raises
        QueryError for an invalid request and EngineBusy when the queue is full."""
        req = self._request(question, top_k, documents, mode, recompute_ratio, max_new_tokens, temperature,
                            top_p, logprobs, seed, namespace, check_layer, deviation, selection, **options)
        req.cancelled = cancelled
        return self.engine.submit(req)

    @torch.inference_mode()
    def score(self, question: str, forced_ids: Sequence[int], **kwargs) -> tuple[torch.Tensor, CacheStats]:
        """Teacher-forced log-probabilities: the distribution of each answer position given `forced_ids`
        before it, through this mode's cache. Returns (fp32 [len(forced_ids), vocab], stats)."""
        logprobs, answer = self.evaluate(question, forced_ids, max_new_tokens=max(1, len(forced_ids)),
                                         free_running=False, **kwargs)
        return logprobs, answer.stats

    def evaluate(self, question: str, forced_ids: Sequence[int] | None, *, free_running: bool = True,
                 **kwargs) -> tuple[torch.Tensor | None, Answer]:
        """One prefill, measured two ways (for fidelity benchmarks).

        Free-running (with free_running): the mode's own greedy answer, decoded first so its TTFT is
        that of a plain query. Teacher-forced: the log-probabilities of each answer position given
        `forced_ids` before it, fp32 [len(forced_ids), vocab]; without forced_ids, those of the greedy
        steps themselves (the mode teacher-forced along its own answer). Rows past the prompt that
        decoding wrote are overwritten by teacher forcing before they are read (each pass writes
        its own rows first and attends only to rows at or before each query).
        """
        kwargs.setdefault("max_new_tokens", len(forced_ids) if forced_ids else None)
        req = self._request(question, kwargs.pop("top_k", None), kwargs.pop("documents", None),
                            kwargs.pop("mode", None), kwargs.pop("recompute_ratio", None),
                            kwargs.pop("max_new_tokens"), 0.0, 1.0, 0, None, kwargs.pop("namespace", None),
                            kwargs.pop("check_layer", None), kwargs.pop("deviation", None),
                            kwargs.pop("selection", None), chunk_scale=kwargs.pop("chunk_scale", None),
                            scale_queries=kwargs.pop("scale_queries", None),
                            system_prompt=kwargs.pop("system_prompt", None), history=kwargs.pop("history", None))
        # Benchmark oracles: blend picks by these per-position scores (bench/oracles.py). Only
        # evaluate() takes them; no serving path does.
        req.selection_scores = kwargs.pop("selection_scores", None)
        # A store's recipe against its plain entries, on one store (bench.run's "-plain" modes).
        req.plain_entries = bool(kwargs.pop("plain_entries", False))
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        with self.rt.lock, torch.inference_mode():
            prep = self._prepare(req)
            first_logits = prep.logits
            steps: list[torch.Tensor] | None = [] if free_running and not forced_ids else None
            # Decode first, so its TTFT is that of a plain query.
            if free_running:
                answer = [e for e in self._decode(req, prep, step_logits=steps) if isinstance(e, Answer)][0]
            else:
                answer = Answer("", [], prep.sources, float("nan"), time.perf_counter() - prep.started,
                                prep.timings, prep.stats, "length")
            if forced_ids:
                rows = [first_logits]
                if len(forced_ids) > 1:
                    n = len(prep.prompt_ids)
                    ids = torch.tensor(list(forced_ids[:-1]), dtype=torch.long)
                    rows.extend(forward_tokens(self.rt.lm, prep.cache, ids, torch.arange(n, n + len(ids)),
                                               all_logits=True).logits)
                steps = rows
        # Without forced_ids, the greedy steps' own distributions: a mode teacher-forced along its own answer.
        logprobs = torch.log_softmax(torch.stack(steps).float(), dim=-1) if steps else None
        return logprobs, answer

    # -- request handling ----------------------------------------------------------------------
    def _request(self, question, top_k, documents, mode, ratio, max_new_tokens, temperature, top_p, logprobs,
                 seed, namespace, check_layer=None, deviation=None, selection=None, *, chunk_scale=None,
                 scale_queries=None, system_prompt=None, history=None, stop=None, repetition_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None) -> Request:
        cfg = self.config
        if not isinstance(question, str) or not question.strip():
            raise QueryError("the question is empty; ask something")
        if len(question) > cfg.max_question_chars:
            raise QueryError(f"the question has {len(question)} characters; the limit is {cfg.max_question_chars}")
        mode = mode or cfg.mode
        if mode not in MODES:
            raise QueryError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        ratio = cfg.recompute_ratio if ratio is None else ratio
        try:
            check_ratio(ratio)
        except ValueError as exc:
            raise QueryError(str(exc)) from None
        top_k_explicit = top_k is not None
        top_k = cfg.top_k if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise QueryError(f"top_k must be an integer >= 0 (0: no store chunks), got {top_k!r}")
        if documents is not None:
            documents = [_document(d) for d in documents]
            if not documents or len(documents) > MAX_DOCUMENTS:
                raise QueryError(f"documents must hold 1 to {MAX_DOCUMENTS} texts, got {len(documents)}")
            bad = [i for i, (text, _) in enumerate(documents) if not isinstance(text, str) or not text.strip()]
            if bad:
                raise QueryError(f"documents {bad} are empty or not text (strings, or dicts with 'text')")
        max_new_tokens = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise QueryError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if temperature < 0:
            raise QueryError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise QueryError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise QueryError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
        try:
            blend = cfg.replace(**{k: v for k, v in (("check_layer", check_layer), ("deviation", deviation),
                                                     ("selection", selection), ("chunk_scale", chunk_scale),
                                                     ("scale_queries", scale_queries)) if v is not None})
        except ValueError as exc:
            raise QueryError(str(exc)) from None
        last_layer = self.rt.lm.num_layers - 1
        if blend.check_layer > last_layer:
            raise QueryError(f"check_layer={blend.check_layer} but the model has {last_layer + 1} layers; "
                             f"use 0 to {last_layer}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise QueryError(f"system_prompt must be text, got {type(system_prompt).__name__}")
        return Request(question, top_k, documents, mode, float(ratio), max_new_tokens, float(temperature),
                       float(top_p), int(logprobs), seed, cfg.namespace if namespace is None else namespace,
                       blend.check_layer, blend.deviation, blend.selection, top_k_explicit, blend.chunk_scale,
                       blend.scale_queries, system_prompt, _turns(history), _stop_strings(stop),
                       *_penalties(repetition_penalty, frequency_penalty, presence_penalty),
                       _logit_bias(logit_bias, len(self.rt.lm.tokenizer)))

    def _prepare(self, req: Request) -> Prepared:
        """The request's prompt, prefilled alone (what the engine does in steps, batched with others)."""
        staged = self._plan(req)
        self._place_kv(staged)
        t = time.perf_counter()
        if staged.positions is None:
            self._choose_positions([staged])
        result = forward_tokens(self.rt.lm, staged.cache, staged.prompt_ids[staged.positions], staged.positions,
                                narrow_at=staged.narrow_at, selector=staged.selector)
        staged.timings.prefill_s = time.perf_counter() - t
        return self._prepared(staged, result.kept_positions, result.logits)

    def _plan(self, req: Request) -> Staged:
        """Retrieve the chunks and lay the prompt out; no KV is allocated yet (see `kv_bytes`)."""
        started = time.perf_counter()
        timings, stats = Timings(), CacheStats(mode=req.mode)
        if req.documents is not None:
            chunks = self._documents(req)
        elif req.top_k == 0:
            chunks = []  # retrieval off: the question (or the earlier turns) carries its own context
        else:
            chunks = self._retrieve(req)
        timings.retrieve_s = time.perf_counter() - started
        try:
            template = self.rt.template_for(req.system_prompt)
            suffix = suffix_token_ids(self.rt.lm.tokenizer, template, req.question, req.history)
        except ConversationError as exc:
            raise QueryError(str(exc)) from None
        chunks, stats.dropped_chunks = self._fit_context(chunks, len(template.prefix_ids), len(suffix),
                                                         req.max_new_tokens)
        # Under a request's own system prompt no chunk sits after the prefix it was computed after.
        layout = PromptLayout(len(template.prefix_ids), tuple(len(c.token_ids) for c in chunks), len(suffix),
                              first_chunk_exact=template is self.rt.template)
        prompt_ids = torch.tensor(list(template.prefix_ids) + [t for c in chunks for t in c.token_ids] + suffix,
                                  dtype=torch.long)
        return Staged(req, chunks, layout, prompt_ids, stats, timings, started, template=template)

    def kv_bytes(self, staged: Staged) -> int:
        """The memory the request's KV cache takes once placed (prompt plus answer)."""
        lm = self.rt.lm
        per_token = kv_bytes_per_token(lm.num_layers, lm.num_kv_heads, lm.head_dim, lm.dtype)
        return per_token * self.cache_tokens(staged)

    def cache_tokens(self, staged: Staged) -> int:
        """The rows the request's KV cache needs: prompt plus answer."""
        return staged.layout.num_tokens + staged.req.max_new_tokens

    def _place_kv(self, staged: Staged, cache: KVCache | None = None) -> None:
        """Fill the request's cache (`cache`, else a new one) from the store, computing misses; decide what the
        prefill computes: `staged.positions`, or None when the probe pass must choose them first."""
        req, layout = staged.req, staged.layout
        staged.cache = cache = cache if cache is not None else new_cache(self.rt.lm, self.cache_tokens(staged))
        t = time.perf_counter()
        if req.mode == "full":
            prefix_read, hits, from_context = False, [False] * len(staged.chunks), []
        else:
            prefix_read, hits, from_context = self._load(req, staged.template, staged.chunks, layout, cache,
                                                         staged.stats)
        staged.timings.load_s = time.perf_counter() - t
        staged.read = (prefix_read, hits)
        staged.sources = [Source(c.text, c.source, c.score, c.key.hex(), hit) for c, hit in zip(staged.chunks, hits)]
        log_scale = self._chunk_log_scale(req.chunk_scale, req.mode) if req.mode != "full" else None
        own = self._context_log_scales(req.chunk_scale, from_context)
        if log_scale is not None or any(v is not None for v in own.values()):
            cache.set_key_bias(chunk_key_bias(layout, log_scale, cache.capacity, own=own),
                               layout.suffix_start if req.scale_queries == "question" else 0)
        staged.positions = initial_positions(req.mode, layout, self.config.epic_tokens)
        if req.mode == "blend" and req.selection == "probe" and req.selection_scores is None:
            staged.positions = None  # chosen by `_choose_positions`
        elif req.mode == "blend" and req.check_layer < self.rt.lm.num_layers - 1:
            staged.narrow_at = req.check_layer
            staged.selector = blend_selector(layout, req.recompute_ratio, deviation=req.deviation,
                                             selection=req.selection, scores=req.selection_scores)

    def _choose_positions(self, batch: list[Staged]) -> None:
        """The probe selection for several requests at once: one reuse pass of each question over its placed
        chunks (chunk scale included, batched), whose attention over every layer picks the rows to recompute.
        Full prefill's question attention, summed over layers, is what the output oracle weighs tokens by
        (docs/FIDELITY.md); this pass approximates it for the cost of reuse. The suffix rows it writes are
        recomputed by the prefill that follows."""
        suffixes = [torch.arange(s.layout.suffix_start, s.layout.num_tokens) for s in batch]
        _, masses = forward_batch(self.rt.lm, [(s.cache, s.prompt_ids[p], p) for s, p in zip(batch, suffixes)],
                                  attention_mass=True)
        for staged, mass in zip(batch, masses):
            staged.positions = prior_positions(staged.layout, staged.req.recompute_ratio, mass)

    def _prepared(self, staged: Staged, kept_positions: torch.Tensor, logits: torch.Tensor) -> Prepared:
        """The prefill's figures, once its last row is computed; `logits` are the first answer token's."""
        req, layout, stats = staged.req, staged.layout, staged.stats
        stats.prompt_tokens = layout.num_tokens
        stats.recomputed_tokens = len(kept_positions)
        if req.mode == "full":
            recomputed_chunk_tokens = layout.num_chunk_tokens
        else:
            recomputed_chunk_tokens = stats.recomputed_tokens - layout.suffix_len
            stats.cached_tokens = cached_token_count(layout, kept_positions, staged.read[1], staged.read[0])
        stats.recompute_fraction = recomputed_chunk_tokens / max(1, layout.num_chunk_tokens)
        return Prepared(staged.cache, staged.prompt_ids, layout, staged.sources, stats, staged.timings, logits,
                        staged.started)

    def _retrieve(self, req: Request) -> list[ChunkRef]:
        self.rt.store.refresh()  # chunks another process added or retired since the last query (one small read)
        index = self.rt.store.index()
        if index.ntotal == 0:
            raise QueryError(f"store {self.rt.store_path} holds no chunks; run `chunkcache ingest PATH "
                             f"--store {self.rt.store_path}` or pass documents=[...]")
        if req.top_k > index.ntotal and not req.top_k_explicit:
            req.top_k = index.ntotal  # the default top_k on a store smaller than it
        if req.top_k > index.ntotal:
            raise QueryError(f"top_k={req.top_k} but the store holds only {index.ntotal} chunks")
        scores, ids = index.search(self.rt.embedder.encode([req.question]), req.top_k)
        # One read for all the chunks' metadata (one transaction in LMDB, one round trip to Redis). While a
        # shared store is unreachable this is answered from what this process saw; what it never saw fails
        # the request (StoreUnavailableError: a 503 to retry).
        keys = self.rt.store.kv.key_for_id([int(i) for i in ids[0]])
        with self.rt.store.kv.reader() as reader:
            reader.prefetch([k for k in keys if k is not None], kv=False, meta=True)
            metas = [_meta_or_none(reader, key) for key in keys]
        chunks = []
        for key, score, meta in zip(keys, scores[0], metas):
            if meta is None:  # retired by another process since the index was refreshed, or damaged (logged)
                continue
            chunks.append(ChunkRef(key, meta["token_ids"], meta["text"], meta["source"], float(score)))
        if not chunks:
            raise QueryError(f"every chunk retrieved from {self.rt.store_path} is gone or damaged; run "
                             f"`chunkcache verify --repair --store {self.rt.store_path}`")
        # NOTE: the store's chunks keep the store's namespace for every tenant. They were ingested before any
        # request, so their being stored says nothing about what another tenant asked (docs/SECURITY.md);
        # re-keying them per tenant only recomputed and stored a copy per tenant.
        return chunks

    def _documents(self, req: Request) -> list[ChunkRef]:
        tok = self.rt.lm.tokenizer
        refs = []
        for i, (text, source) in enumerate(req.documents):
            ids = chunk_token_ids(tok, text)
            refs.append(ChunkRef(self.rt.key_for(ids, req.namespace), ids, text.strip(), source or f"documents[{i}]",
                                 None, from_request=True))
        return refs

    def _fit_context(self, chunks: list[ChunkRef], prefix_len: int, suffix_len: int, max_new_tokens: int):
        """Drop the lowest-ranked chunks until the prompt and the answer fit the model's context."""
        limit = self.rt.lm.max_context
        fixed = prefix_len + suffix_len + max_new_tokens
        if fixed > limit:
            raise QueryError(f"the prompt without documents ({fixed - max_new_tokens} tokens) plus max_new_tokens="
                             f"{max_new_tokens} exceeds the model's context of {limit} tokens; shorten the question "
                             "or lower max_new_tokens")
        kept = list(chunks)
        while kept and fixed + sum(len(c.token_ids) for c in kept) > limit:
            kept.pop()
        return kept, len(chunks) - len(kept)

    def _unstored(self, req: Request, chunks: list[ChunkRef], missing: set[bytes]) -> set[bytes]:
        """The missed request documents to compute for this request only: all of them with persist_documents
        off, else those past the caller's document quota. The others are charged to the caller (with or
        without a quota, so that the figures exist when one is set)."""
        cfg, rt = self.config, self.rt
        new = list({c.key: c for c in chunks if c.from_request and c.key in missing}.values())
        if not new:
            return set()
        if not cfg.persist_documents:
            return {c.key for c in new}
        costs = [kv_entry_bytes(len(c.token_ids), rt.lm.num_layers, rt.lm.num_kv_heads, rt.lm.head_dim, cfg.kv_dtype)
                 for c in new]
        granted = rt.store.kv.charge_documents(req.namespace, costs, cfg.document_quota_bytes)
        refused = {c.key for c, ok in zip(new, granted) if not ok}
        if refused:
            log.info("namespace %r is over its document quota (%d bytes): %d document(s) not stored",
                     req.namespace, cfg.document_quota_bytes, len(refused))
        return refused

    def _load(self, req: Request, template: PromptTemplate, chunks: list[ChunkRef], layout: PromptLayout,
              cache: KVCache, stats: CacheStats) -> tuple[bool, list[bool], list[bool]]:
        """Fill the cache rows of the prefix and every chunk from the store, computing misses first ->
        (whether the prefix's KV was read rather than computed, whether each chunk's was, whether each chunk's
        came from its context-enriched entry: chunkcache/context.py).

        A stored entry that fails its checksum (or was evicted meanwhile) is a miss too: it is recomputed into
        the cache, the store's copy is rewritten (best effort: a full disk only logs), and the request goes on.
        A request's own system prompt makes its own prefix, kept in memory (`Runtime.request_prefix_kv`).
        """
        rt = self.rt
        prefix_read = True
        if template is not rt.template:
            kv, prefix_read = rt.request_prefix_kv(template, req.namespace)
            cache.k[:, :, :layout.prefix_len].copy_(kv[0])
            cache.v[:, :, :layout.prefix_len].copy_(kv[1])
        prefix_key = rt.prefix_key()
        own_prefix = template is rt.template
        # One existence check for the chunks and the store's prefix: one round trip to a shared store.
        missing = set(rt.store.kv.missing([c.key for c in chunks] + ([prefix_key] if own_prefix else [])))
        prefix_read = prefix_read and prefix_key not in missing
        unstored = self._store_misses(req, chunks, missing, prefix_key)
        entries = [(prefix_key, None)] if own_prefix else []
        placed = list(zip(chunks, layout.chunk_starts))
        failed: set[bytes] = set()  # damaged, or evicted by another writer since the misses were stored
        damaged: set[bytes] = set()
        with rt.store.kv.reader() as reader:
            # chunk start -> the enriched entry placed there instead of the plain one (every chunk but the first)
            context = _linked_entries(reader, placed[1:]) if enriched(rt) and not req.plain_entries else {}
            reader.prefetch([key for key, _ in entries] + [context.get(s, c.key) for c, s in placed])
            for key, start in entries + [(c.key, s) for c, s in placed]:
                entry = _context_entry(reader, context, start)
                try:
                    entry = reader.kv(key) if entry is None else entry
                except CorruptEntryError as exc:
                    log.warning("%s; recomputing it for this request and rewriting it", exc)
                    entry = None
                    damaged.add(key)
                if entry is None:
                    failed.add(key)
                elif start is None:
                    cache.k[:, :, :layout.prefix_len].copy_(entry[0])
                    cache.v[:, :, :layout.prefix_len].copy_(entry[1])
                else:
                    self._place(entry, start, layout, cache)
        if failed:
            self._recompute(placed, failed, layout, cache, keep_out=unstored)
        stats.store_unavailable = not getattr(rt.store.kv, "available", True)  # a shared store's last call failed
        stats.damaged_chunks = len(damaged)
        stats.context_chunks = len(context)
        stats.unstored_chunks = sum(c.key in unstored for c in chunks)
        misses = missing | failed
        stats.chunk_misses = sum(c.key in misses for c in chunks)
        stats.chunk_hits = len(chunks) - stats.chunk_misses
        # Only request text's usage orders eviction; corpus entries are evicted blind to who read them.
        rt.store.kv.touch([c.key for c in chunks if c.from_request and c.key not in misses])
        cache.length = layout.suffix_start
        return (prefix_read and prefix_key not in failed, [c.key not in misses for c in chunks],
                [s in context for _, s in placed])

    def _store_misses(self, req: Request, chunks: list[ChunkRef], missing: set[bytes], prefix_key: bytes) -> set[bytes]:
        """Compute and store the missed chunks (and the store's prompt prefix) so that the reads that follow
        find them; returns the request documents to compute for this request only (`_unstored`). While a
        shared store is unreachable nothing is stored: the reads miss and the request computes them once,
        rather than compute them to store and again when the write fails (the store logs the outage)."""
        rt = self.rt
        unstored: set[bytes] = set()
        if not getattr(rt.store.kv, "available", True):
            return unstored
        try:
            unstored = self._unstored(req, chunks, missing)
            todo = [c for c in chunks if c.key in missing and c.key not in unstored]
            if todo:
                store_chunks(rt, [PendingChunk(c.key, c.token_ids, c.text, {
                    "source": c.source, "text": c.text, "token_ids": c.token_ids, "num_tokens": len(c.token_ids),
                    "namespace": req.namespace}) for c in todo], embed=False)
            if prefix_key in missing:
                ensure_prefix(rt)
        except StoreUnavailableError as exc:  # it went away meanwhile: the reads below miss instead
            log.debug("%s; computing this request's misses locally", exc)
        return unstored

    def _place(self, entry: torch.Tensor, start: int, layout: PromptLayout, cache: KVCache) -> None:
        """Copy one chunk's stored KV [2, layers, kv_heads, n, head_dim] into the cache at `start`, keys
        re-rotated from the position they were computed at."""
        device = self.rt.lm.device
        entry = entry.to(device, non_blocking=True)
        n = entry.shape[3]
        # Chunks were computed right after the store's prefix (a request's own prefix may be longer or shorter).
        delta = torch.full((n,), start - len(self.rt.template.prefix_ids), dtype=torch.long, device=device)
        rerotate_layers(entry[0], delta, self.rt.lm.ropes, out=cache.k[:, :, start:start + n])
        cache.v[:, :, start:start + n].copy_(entry[1])

    def _recompute(self, placed: list[tuple[ChunkRef, int]], failed: set[bytes], layout: PromptLayout,
                   cache: KVCache, keep_out: set[bytes] = frozenset()) -> None:
        """Compute the failed entries as ingest would, place them in the cache and rewrite the store's copies
        (except those in `keep_out`: documents computed for this request only)."""
        rt = self.rt
        prefix_ids = list(rt.template.prefix_ids)
        todo = [(c, s) for c, s in placed if c.key in failed]
        scratch = prefix_cache(rt.lm, prefix_ids, len(prefix_ids) + max((len(c.token_ids) for c, _ in todo),
                                                                         default=0))
        fresh = []
        # NOTE: placed as a store read would return them (int8: dequantized), so a hit and a miss answer alike.
        if rt.prefix_key() in failed:
            kv = extract_kv(scratch, 0, len(prefix_ids), rt.kv_dtype)
            dense = dense_kv(kv)
            cache.k[:, :, :layout.prefix_len].copy_(dense[0])
            cache.v[:, :, :layout.prefix_len].copy_(dense[1])
            fresh.append((rt.prefix_key(), kv))
        for chunk, start in todo:
            kv = chunk_kv(rt.lm, scratch, len(prefix_ids), chunk.token_ids, rt.kv_dtype)
            self._place(dense_kv(kv), start, layout, cache)
            fresh.append((chunk.key, kv))
        fresh = [(key, kv) for key, kv in fresh if key not in keep_out]
        try:
            if fresh:
                rt.store.kv.replace_kv(fresh)
        except StoreUnavailableError as exc:  # logged once per outage by the store
            log.debug("%s; %d recomputed KV entries used from memory only", exc, len(fresh))
        except StoreError as exc:
            log.warning("could not rewrite %d recomputed KV entries (%s); this request uses them from memory",
                        len(fresh), exc)

    def _chunk_log_scale(self, chunk_scale, mode: str) -> torch.Tensor | None:
        """log(S) [layers, 1 or q_heads] on device for this request's chunk_scale, or None for none.
        "calibrated": blend's own uniform S where the model's calibration has one, else the per-layer
        table fitted for reuse (chunkcache/calibration.py)."""
        lm = self.rt.lm
        if chunk_scale == "off" or chunk_scale == 1:
            return None
        if chunk_scale == "calibrated":
            blend_value = load_blend_log_scale(lm.calibration_id) if mode == "blend" else None
            if blend_value is not None:
                return torch.full((lm.num_layers, 1), blend_value, device=lm.device)
            table = load_chunk_log_scale(lm.calibration_id, lm.num_layers, lm.num_q_heads)
            return None if table is None else table.to(lm.device)
        return torch.full((lm.num_layers, 1), math.log(chunk_scale), device=lm.device)

    def _context_log_scales(self, chunk_scale, from_context: list[bool]) -> dict[int, torch.Tensor | None]:
        """{chunk index: log(S) [layers, 1] on device, or None for S = 1} for the chunks placed from their
        context-enriched entry, under the "calibrated" scale: the recipe's own S. A given S (or "off") applies
        to every stale chunk alike, so then there is nothing of their own."""
        if chunk_scale != "calibrated" or not any(from_context):
            return {}
        lm = self.rt.lm
        value = load_context_log_scale(lm.calibration_id, self.config.chunk_context)
        scale = None if value is None else torch.full((lm.num_layers, 1), value, device=lm.device)
        return {i: scale for i, placed in enumerate(from_context) if placed}

    def _generation(self, req: Request, prep: Prepared,
                    step_logits: list[torch.Tensor] | None = None) -> Generation:
        lm = self.rt.lm
        return Generation(lm.tokenizer, lm.eos_token_ids, max_new_tokens=req.max_new_tokens,
                          temperature=req.temperature, top_p=req.top_p, logprobs=req.logprobs, seed=req.seed,
                          prompt_ids=prep.prompt_ids, started=prep.started, sources=prep.sources,
                          timings=prep.timings, stats=prep.stats, cancelled=req.cancelled, step_logits=step_logits,
                          stop=req.stop,
                          processors=logits_processors(prompt_len=len(prep.prompt_ids),
                                                       repetition_penalty=req.repetition_penalty,
                                                       frequency_penalty=req.frequency_penalty,
                                                       presence_penalty=req.presence_penalty,
                                                       logit_bias=req.logit_bias),
                          config={"mode": req.mode, "recompute_ratio": req.recompute_ratio,
                                  "check_layer": req.check_layer, "deviation": req.deviation,
                                  "selection": req.selection, "chunk_scale": req.chunk_scale,
                                  "scale_queries": req.scale_queries, "model": lm.spec,
                                  "model_fingerprint": lm.fingerprint})

    def _decode(self, req: Request, prep: Prepared,
                step_logits: list[torch.Tensor] | None = None) -> Iterator[str | Answer]:
        """Decode one prepared request alone (the engine decodes many in batched steps)."""
        gen = self._generation(req, prep, step_logits)
        logits = prep.logits
        while True:
            yield from gen.feed(logits)
            if gen.done:
                break
            token, position = gen.next_input()
            logits = forward_tokens(self.rt.lm, prep.cache, torch.tensor([token]), torch.tensor([position])).logits
        rest, answer = gen.answer()
        yield from rest
        yield answer

    def close(self) -> None:
        """Stop the engine (requests still in it get EngineClosed), then close the store."""
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        with self.rt.lock:  # a direct call (ingest, evaluate) still running finishes first
            self.rt.close()


def _document(doc) -> tuple[object, str | None]:
    """(text, source) from a request document: a string, or a dict with "text" and optional "source"."""
    if isinstance(doc, dict):
        source = doc.get("source")
        return doc.get("text"), None if source is None else str(source)
    return doc, None


MAX_STOP_STRINGS = 4  # OpenAI's bound


def _stop_strings(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise QueryError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings, got {stop!r}")
    return stops


def _penalties(repetition: float, frequency: float, presence: float) -> tuple[float, float, float]:
    if not (isinstance(repetition, (int, float)) and 0 < repetition <= 10):
        raise QueryError(f"repetition_penalty must be in (0, 10] (1 = off), got {repetition!r}")
    for name, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
        if not (isinstance(value, (int, float)) and -2 <= value <= 2):
            raise QueryError(f"{name} must be in [-2, 2], got {value!r}")
    return float(repetition), float(frequency), float(presence)


def _logit_bias(bias, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for token, value in bias.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            raise QueryError(f"logit_bias keys must be token ids, got {token!r}") from None
        if not 0 <= token_id < vocab_size:
            raise QueryError(f"logit_bias token {token_id} is not in the vocabulary (0 to {vocab_size - 1})")
        if not (isinstance(value, (int, float)) and -100 <= value <= 100):
            raise QueryError(f"logit_bias values must be in [-100, 100], got {value!r} for token {token_id}")
        out[token_id] = float(value)
    return out


def _turns(history) -> tuple[tuple[str, str], ...]:
    """Earlier turns as (role, text) pairs, from pairs or OpenAI-style {"role", "content"} messages."""
    turns = []
    for i, turn in enumerate(history or ()):
        role, text = (turn.get("role"), turn.get("content")) if isinstance(turn, dict) else tuple(turn)
        if role not in ("user", "assistant") or not isinstance(text, str):
            raise QueryError(f"history[{i}] must be a user or assistant turn with text, got role {role!r}")
        turns.append((role, text))
    if turns and turns[0][0] != "user":
        raise QueryError("history must open with a user turn (the one the documents go with)")
    return tuple(turns)


def _linked_entries(reader, placed: list[tuple[ChunkRef, int]]) -> dict[int, bytes]:
    """{chunk start: the key of the chunk's context-enriched entry} for the placed chunks whose metadata links one."""
    linked = {}
    try:
        reader.prefetch([c.key for c, _ in placed], kv=False, meta=True)
        for chunk, start in placed:
            try:
                meta = reader.meta(chunk.key)
            except CorruptEntryError:  # its plain entry then (`chunkcache verify` reports the damage)
                continue
            if meta and meta.get("context_key"):
                linked[start] = bytes.fromhex(meta["context_key"])
    except StoreUnavailableError as exc:  # the shared store went away: plain entries (computed if need be)
        log.debug("%s; placing plain entries", exc)
    return linked


def _context_entry(reader, context: dict[int, bytes], start: int | None):
    """The enriched entry to place at `start`, or None (then the plain one): none linked, evicted or damaged
    (logged). An entry that falls back leaves `context`."""
    if start not in context:
        return None
    try:
        entry = reader.kv(context[start])
    except CorruptEntryError as exc:
        log.warning("%s; placing the chunk's plain entry (`chunkcache verify --repair` recomputes it)", exc)
        entry = None
    except StoreUnavailableError as exc:  # the shared store went away: the plain entry (computed if need be)
        log.debug("%s; placing the chunk's plain entry", exc)
        entry = None
    if entry is None:
        del context[start]
    return entry


def _meta_or_none(reader, key: bytes | None) -> dict | None:
    """A retrieved chunk's metadata; None (logged) if it is gone or damaged, so one bad row fails no query."""
    if key is None:
        return None
    try:
        return reader.meta(key)
    except CorruptEntryError as exc:
        log.warning("%s; leaving the chunk out of this answer", exc)
        return None
