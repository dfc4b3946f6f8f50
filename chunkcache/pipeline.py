"""`RAGPipeline`: retrieve, load cached chunk KVs, blend, decode.

    pipe = RAGPipeline.open("stores/demo")
    answer = pipe.query("What does the with statement do?")
    print(answer.text, answer.ttft_s, answer.stats)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from store import CorruptEntryError, StoreError

from .accounting import cached_token_count, kv_entry_bytes
from .answer import Answer, CacheStats, Source, Timings
from .blend import PromptLayout, blend_selector, chunk_key_bias, initial_positions, prior_positions
from .calibration import load_chunk_log_scale
from .config import MODES, ChunkCacheConfig, check_ratio
from .forward import KVCache, forward_tokens, new_cache
from .ingest import IngestReport, PendingChunk, ensure_prefix, ingest_paths, store_chunks
from .kvcompute import chunk_kv, dense_kv, extract_kv, prefix_cache
from .prompt import chunk_token_ids, suffix_token_ids
from .rope import rerotate_layers
from .runtime import Runtime
from .sampling import next_token, top_logprobs

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
MAX_DOCUMENTS = 64


class QueryError(ValueError):
    """A request the pipeline cannot serve as asked; the message says why and what to change."""


class RequestCancelled(RuntimeError):
    """The caller's `cancelled()` said stop before the request reached the model (e.g. its client left)."""


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
    documents: list[str] | None
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
    selection_scores: torch.Tensor | None = None  # benchmark oracles only (see `evaluate`)
    cancelled: Callable[[], bool] | None = None  # polled between decode steps: True stops the request


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
    """Chunk-cached retrieval-augmented generation over one store; one request runs at a time."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime

    @classmethod
    def open(cls, store_dir, *, config: ChunkCacheConfig | None = None, lm=None, embedder=None,
             **overrides) -> "RAGPipeline":
        """Open the store made by `chunkcache ingest` (or create an empty one) with the models it was
        built with; overrides are ChunkCacheConfig fields (mode, recompute_ratio, top_k, device, ...)."""
        return cls(Runtime.open(store_dir, config, lm=lm, embedder=embedder, **overrides))

    @property
    def config(self) -> ChunkCacheConfig:
        return self.rt.config

    def ingest(self, paths, *, progress: bool = True) -> IngestReport:
        return ingest_paths(self.rt, [paths] if isinstance(paths, (str, bytes)) else paths, progress=progress)

    def query(self, question: str, **kwargs) -> Answer:
        """Answer `question`. Keyword arguments: top_k, documents, mode, recompute_ratio, max_new_tokens,
        temperature, top_p, logprobs, seed, namespace (see `events`)."""
        for event in self.events(question, **kwargs):
            if isinstance(event, Answer):
                return event
        raise AssertionError("events() ended without an Answer")

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
               scale_queries: str | None = None, cancelled: Callable[[], bool] | None = None
               ) -> Iterator[str | Answer]:
        """Text pieces as they are decoded, then the final `Answer`.

        Args:
            question: the user's question (non-empty).
            top_k: chunks to retrieve (default from config); ignored with `documents`.
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
            cancelled: polled once the model is free and between decode steps; when it returns True the
                request stops: before it starts, RequestCancelled; while decoding, an Answer with what
                was decoded and finish_reason "cancelled" (a server passes "the client has left").
        """
        req = self._request(question, top_k, documents, mode, recompute_ratio, max_new_tokens, temperature,
                            top_p, logprobs, seed, namespace, check_layer, deviation, selection,
                            chunk_scale=chunk_scale, scale_queries=scale_queries)
        req.cancelled = cancelled
        with self.rt.lock:
            if cancelled is not None and cancelled():
                raise RequestCancelled("the request was cancelled before it reached the model")
            prep = self._prepare(req)
            yield from self._decode(req, prep)

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
                            scale_queries=kwargs.pop("scale_queries", None))
        # Benchmark oracles: blend picks by these per-position scores (bench/oracles.py). Only
        # evaluate() takes them; no serving path does.
        req.selection_scores = kwargs.pop("selection_scores", None)
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
                 scale_queries=None) -> Request:
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
        if not isinstance(top_k, int) or top_k < 1:
            raise QueryError(f"top_k must be an integer >= 1, got {top_k!r}")
        if documents is not None:
            documents = list(documents)
            if not documents or len(documents) > MAX_DOCUMENTS:
                raise QueryError(f"documents must hold 1 to {MAX_DOCUMENTS} texts, got {len(documents)}")
            bad = [i for i, d in enumerate(documents) if not isinstance(d, str) or not d.strip()]
            if bad:
                raise QueryError(f"documents {bad} are empty or not text")
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
        return Request(question, top_k, documents, mode, float(ratio), max_new_tokens, float(temperature),
                       float(top_p), int(logprobs), seed, cfg.namespace if namespace is None else namespace,
                       blend.check_layer, blend.deviation, blend.selection, top_k_explicit, blend.chunk_scale,
                       blend.scale_queries)

    def _prepare(self, req: Request) -> Prepared:
        started = time.perf_counter()
        timings, stats = Timings(), CacheStats(mode=req.mode)
        chunks = self._documents(req) if req.documents is not None else self._retrieve(req)
        timings.retrieve_s = time.perf_counter() - started
        suffix = suffix_token_ids(self.rt.lm.tokenizer, self.rt.template, req.question)
        chunks, stats.dropped_chunks = self._fit_context(chunks, len(suffix), req.max_new_tokens)
        layout = PromptLayout(len(self.rt.template.prefix_ids), tuple(len(c.token_ids) for c in chunks), len(suffix))
        prompt_ids = torch.tensor(list(self.rt.template.prefix_ids) + [t for c in chunks for t in c.token_ids]
                                  + suffix, dtype=torch.long)
        cache = new_cache(self.rt.lm, layout.num_tokens + req.max_new_tokens)
        t = time.perf_counter()
        prefix_read = req.mode != "full" and self.rt.prefix_key() in self.rt.store.kv  # else computed now
        hits = self._load(req, chunks, layout, cache, stats) if req.mode != "full" else [False] * len(chunks)
        timings.load_s = time.perf_counter() - t
        t = time.perf_counter()
        logits = self._prefill(req, layout, prompt_ids, cache, stats, read=(prefix_read, hits))
        timings.prefill_s = time.perf_counter() - t
        sources = [Source(c.text, c.source, c.score, c.key.hex(), hit) for c, hit in zip(chunks, hits)]
        return Prepared(cache, prompt_ids, layout, sources, stats, timings, logits, started)

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
        keys = self.rt.store.kv.key_for_id([int(i) for i in ids[0]])
        with self.rt.store.kv.reader() as reader:  # one read transaction for all the chunks' metadata
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
        for i, text in enumerate(req.documents):
            ids = chunk_token_ids(tok, text)
            refs.append(ChunkRef(self.rt.key_for(ids, req.namespace), ids, text.strip(), f"documents[{i}]", None,
                                 from_request=True))
        return refs

    def _fit_context(self, chunks: list[ChunkRef], suffix_len: int, max_new_tokens: int):
        """Drop the lowest-ranked chunks until the prompt and the answer fit the model's context."""
        limit = self.rt.lm.max_context
        fixed = len(self.rt.template.prefix_ids) + suffix_len + max_new_tokens
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

    def _load(self, req: Request, chunks: list[ChunkRef], layout: PromptLayout, cache: KVCache,
              stats: CacheStats) -> list[bool]:
        """Fill the cache rows of the prefix and every chunk from the store, computing misses first.

        A stored entry that fails its checksum (or was evicted meanwhile) is a miss too: it is recomputed into
        the cache, the store's copy is rewritten (best effort: a full disk only logs), and the request goes on.
        """
        rt = self.rt
        missing = set(rt.store.kv.missing([c.key for c in chunks]))
        unstored = self._unstored(req, chunks, missing)  # computed below for this request only
        if missing - unstored:
            store_chunks(rt, [PendingChunk(c.key, c.token_ids, c.text, {
                "source": c.source, "text": c.text, "token_ids": c.token_ids, "num_tokens": len(c.token_ids),
                "namespace": req.namespace}) for c in chunks if c.key in missing and c.key not in unstored],
                embed=False)
        prefix_key = rt.prefix_key()
        if prefix_key not in rt.store.kv:
            ensure_prefix(rt)
        placed = list(zip(chunks, layout.chunk_starts))
        failed: set[bytes] = set()  # damaged, or evicted by another writer since the misses were stored
        damaged: set[bytes] = set()
        with rt.store.kv.reader() as reader:
            for key, start in [(prefix_key, None)] + [(c.key, s) for c, s in placed]:
                try:
                    entry = reader.kv(key)
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
        stats.damaged_chunks = len(damaged)
        stats.unstored_chunks = sum(c.key in unstored for c in chunks)
        misses = missing | failed
        stats.chunk_misses = sum(c.key in misses for c in chunks)
        stats.chunk_hits = len(chunks) - stats.chunk_misses
        # Only request text's usage orders eviction; corpus entries are evicted blind to who read them.
        rt.store.kv.touch([c.key for c in chunks if c.from_request and c.key not in misses])
        cache.length = layout.suffix_start
        return [c.key not in misses for c in chunks]

    def _place(self, entry: torch.Tensor, start: int, layout: PromptLayout, cache: KVCache) -> None:
        """Copy one chunk's stored KV [2, layers, kv_heads, n, head_dim] into the cache at `start`, keys
        re-rotated from the position they were computed at."""
        device = self.rt.lm.device
        entry = entry.to(device, non_blocking=True)
        n = entry.shape[3]
        delta = torch.full((n,), start - layout.prefix_len, dtype=torch.long, device=device)
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
        except StoreError as exc:
            log.warning("could not rewrite %d recomputed KV entries (%s); this request uses them from memory",
                        len(fresh), exc)

    def _prefill(self, req: Request, layout: PromptLayout, prompt_ids: torch.Tensor, cache: KVCache,
                 stats: CacheStats, read: tuple[bool, Sequence[bool]] = (True, ())) -> torch.Tensor:
        """`read`: whether the prefix's and each chunk's KV was read from the store (for cached_tokens)."""
        positions = initial_positions(req.mode, layout, self.config.epic_tokens)
        log_scale = self._chunk_log_scale(req.chunk_scale) if req.mode != "full" else None
        if log_scale is not None:
            cache.key_bias = chunk_key_bias(layout, log_scale, cache.capacity)
            cache.bias_from = layout.suffix_start if req.scale_queries == "question" else 0
        narrow_at, selector = None, None
        if req.mode == "blend" and req.selection == "probe" and req.selection_scores is None:
            prior = _question_attention_prior(self.rt.lm, cache, prompt_ids, layout)
            positions = prior_positions(layout, req.recompute_ratio, prior)
        elif req.mode == "blend" and req.check_layer < self.rt.lm.num_layers - 1:
            narrow_at = req.check_layer
            selector = blend_selector(layout, req.recompute_ratio, deviation=req.deviation, selection=req.selection,
                                      scores=req.selection_scores)
        result = forward_tokens(self.rt.lm, cache, prompt_ids[positions], positions, narrow_at=narrow_at,
                                selector=selector)
        stats.prompt_tokens = layout.num_tokens
        stats.recomputed_tokens = len(result.kept_positions)
        if req.mode == "full":
            recomputed_chunk_tokens = layout.num_chunk_tokens
        else:
            recomputed_chunk_tokens = stats.recomputed_tokens - layout.suffix_len
            stats.cached_tokens = cached_token_count(layout, result.kept_positions, read[1], read[0])
        stats.recompute_fraction = recomputed_chunk_tokens / max(1, layout.num_chunk_tokens)
        return result.logits

    def _chunk_log_scale(self, chunk_scale) -> torch.Tensor | None:
        """log(S) [layers, 1 or q_heads] on device for this request's chunk_scale, or None for none."""
        lm = self.rt.lm
        if chunk_scale == "off" or chunk_scale == 1:
            return None
        if chunk_scale == "calibrated":
            table = load_chunk_log_scale(lm.calibration_id, lm.num_layers, lm.num_q_heads)
            return None if table is None else table.to(lm.device)
        return torch.full((lm.num_layers, 1), math.log(chunk_scale), device=lm.device)

    def _decode(self, req: Request, prep: Prepared,
                step_logits: list[torch.Tensor] | None = None) -> Iterator[str | Answer]:
        lm = self.rt.lm
        tokenizer = lm.tokenizer
        generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        eos = lm.eos_token_ids
        logits, pos = prep.logits, len(prep.prompt_ids)
        out: list[int] = []
        logprob_rows: list[dict] = []
        emitted = ""
        ttft = None
        finish = "length"
        decode_started = time.perf_counter()
        for step in range(req.max_new_tokens):
            if req.cancelled is not None and req.cancelled():
                finish = "cancelled"  # nobody waits for the rest: free the model for the next request
                break
            token = next_token(logits, req.temperature, req.top_p, generator)
            if step_logits is not None:
                step_logits.append(logits)
            if ttft is None:
                ttft = time.perf_counter() - prep.started
            if req.logprobs:
                logprob_rows.append(top_logprobs(logits, token, req.logprobs, tokenizer.decode))
            if token in eos:
                finish = "stop"
                break
            out.append(token)
            text = tokenizer.decode(out, skip_special_tokens=True)
            # Hold back a piece that ends inside a multi-byte character until it completes.
            if len(text) > len(emitted) and not text.endswith("\ufffd"):
                yield text[len(emitted):]
                emitted = text
            if step + 1 < req.max_new_tokens:
                logits = forward_tokens(lm, prep.cache, torch.tensor([token]), torch.tensor([pos])).logits
                pos += 1
        text = tokenizer.decode(out, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted):]
        prep.timings.decode_s = time.perf_counter() - decode_started
        prep.stats.completion_tokens = len(out)
        yield Answer(text=text.strip(), token_ids=out, sources=prep.sources, ttft_s=ttft,
                     total_s=time.perf_counter() - prep.started, timings=prep.timings, stats=prep.stats,
                     finish_reason=finish, logprobs=logprob_rows if req.logprobs else None,
                     config={"mode": req.mode, "recompute_ratio": req.recompute_ratio,
                             "check_layer": req.check_layer, "deviation": req.deviation,
                             "selection": req.selection, "chunk_scale": req.chunk_scale,
                             "scale_queries": req.scale_queries, "model": self.rt.lm.spec,
                             "model_fingerprint": self.rt.lm.fingerprint})

    def close(self) -> None:
        self.rt.close()


def _meta_or_none(reader, key: bytes | None) -> dict | None:
    """A retrieved chunk's metadata; None (logged) if it is gone or damaged, so one bad row fails no query."""
    if key is None:
        return None
    try:
        return reader.meta(key)
    except CorruptEntryError as exc:
        log.warning("%s; leaving the chunk out of this answer", exc)
        return None


def _question_attention_prior(lm, cache: KVCache, prompt_ids: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    """The "probe" selection's prior: a reuse pass of the question alone over the placed chunks (their
    cached KV, chunk scale included), returning the attention it paid each position over every layer
    (fp32 [prompt tokens]). Full prefill's question attention, summed over layers, is what the output
    oracle weighs tokens by (docs/FIDELITY.md); this pass approximates it for the cost of reuse.
    The suffix rows it writes are recomputed by the blend pass that follows."""
    positions = torch.arange(layout.suffix_start, layout.num_tokens)
    return forward_tokens(lm, cache, prompt_ids[positions], positions, attention_mass=True).info["attention_mass"]

