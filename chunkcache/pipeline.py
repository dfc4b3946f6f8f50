"""`RAGPipeline`: retrieve, load cached chunk KVs, blend, decode.

    pipe = RAGPipeline.open("stores/demo")
    answer = pipe.query("What does the with statement do?")
    print(answer.text, answer.ttft_s, answer.stats)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from blend_kernels import rerotate_keys

from .answer import Answer, CacheStats, Source, Timings
from .blend import PromptLayout, blend_selector, initial_positions
from .config import MODES, ChunkCacheConfig, check_ratio
from .forward import KVCache, forward_tokens, new_cache
from .ingest import IngestReport, PendingChunk, ensure_prefix, ingest_paths, store_chunks
from .prompt import chunk_token_ids, suffix_token_ids
from .runtime import Runtime
from .sampling import next_token, top_logprobs

MAX_LOGPROBS = 20
MAX_DOCUMENTS = 64


class QueryError(ValueError):
    """A request the pipeline cannot serve as asked; the message says why and what to change."""


@dataclass
class ChunkRef:
    key: bytes
    token_ids: list[int]
    text: str
    source: str
    score: float | None


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
               selection: str | None = None) -> Iterator[str | Answer]:
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
        """
        req = self._request(question, top_k, documents, mode, recompute_ratio, max_new_tokens, temperature,
                            top_p, logprobs, seed, namespace, check_layer, deviation, selection)
        with self.rt.lock:
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
                            kwargs.pop("selection", None))
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
                 seed, namespace, check_layer=None, deviation=None, selection=None) -> Request:
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
                                                     ("selection", selection)) if v is not None})
        except ValueError as exc:
            raise QueryError(str(exc)) from None
        return Request(question, top_k, documents, mode, float(ratio), max_new_tokens, float(temperature),
                       float(top_p), int(logprobs), seed, cfg.namespace if namespace is None else namespace,
                       blend.check_layer, blend.deviation, blend.selection, top_k_explicit)

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
        hits = self._load(req, chunks, layout, cache, stats) if req.mode != "full" else [False] * len(chunks)
        timings.load_s = time.perf_counter() - t
        t = time.perf_counter()
        logits = self._prefill(req, layout, prompt_ids, cache, stats)
        timings.prefill_s = time.perf_counter() - t
        sources = [Source(c.text, c.source, c.score, c.key.hex(), hit) for c, hit in zip(chunks, hits)]
        return Prepared(cache, prompt_ids, layout, sources, stats, timings, logits, started)

    def _retrieve(self, req: Request) -> list[ChunkRef]:
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
            metas = [reader.meta(key) if key is not None else None for key in keys]
        chunks = []
        for key, score, meta in zip(keys, scores[0], metas):
            if meta is None:
                raise QueryError(f"the index of {self.rt.store_path} points at a chunk the store lacks; "
                                 "delete index.faiss there to rebuild it")
            chunks.append(ChunkRef(key, meta["token_ids"], meta["text"], meta["source"], float(score)))
        if req.namespace != self.config.namespace:
            # The store's chunks are keyed under the store's namespace; a tenant gets its own copies.
            chunks = [ChunkRef(self.rt.key_for(c.token_ids, req.namespace), c.token_ids, c.text, c.source, c.score)
                      for c in chunks]
        return chunks

    def _documents(self, req: Request) -> list[ChunkRef]:
        tok = self.rt.lm.tokenizer
        refs = []
        for i, text in enumerate(req.documents):
            ids = chunk_token_ids(tok, text)
            refs.append(ChunkRef(self.rt.key_for(ids, req.namespace), ids, text.strip(), f"documents[{i}]", None))
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

    def _load(self, req: Request, chunks: list[ChunkRef], layout: PromptLayout, cache: KVCache,
              stats: CacheStats) -> list[bool]:
        """Fill the cache rows of the prefix and every chunk from the store, computing misses first."""
        rt = self.rt
        missing = set(rt.store.kv.missing([c.key for c in chunks]))
        if missing:
            store_chunks(rt, [PendingChunk(c.key, c.token_ids, c.text, {
                "source": c.source, "text": c.text, "token_ids": c.token_ids, "num_tokens": len(c.token_ids),
                "namespace": req.namespace}) for c in chunks if c.key in missing], embed=False)
        stats.chunk_misses = sum(c.key in missing for c in chunks)
        stats.chunk_hits = len(chunks) - stats.chunk_misses
        prefix_key = rt.prefix_key()
        if prefix_key not in rt.store.kv:
            ensure_prefix(rt)
        device = rt.lm.device
        with rt.store.kv.reader() as reader:
            entry = reader.kv(prefix_key)
            cache.k[:, :, :layout.prefix_len].copy_(entry[0])
            cache.v[:, :, :layout.prefix_len].copy_(entry[1])
            for chunk, start in zip(chunks, layout.chunk_starts):
                entry = reader.kv(chunk.key).to(device, non_blocking=True)
                n = entry.shape[3]
                delta = torch.full((n,), start - layout.prefix_len, dtype=torch.long, device=device)
                rerotate_keys(entry[0], delta, rt.lm.inv_freq, out=cache.k[:, :, start:start + n])
                cache.v[:, :, start:start + n].copy_(entry[1])
        cache.length = layout.suffix_start
        return [c.key not in missing for c in chunks]

    def _prefill(self, req: Request, layout: PromptLayout, prompt_ids: torch.Tensor, cache: KVCache,
                 stats: CacheStats) -> torch.Tensor:
        positions = initial_positions(req.mode, layout, self.config.epic_tokens)
        narrow_at, selector = None, None
        if req.mode == "blend" and req.check_layer < self.rt.lm.num_layers - 1:
            narrow_at = req.check_layer
            selector = blend_selector(layout, req.recompute_ratio, deviation=req.deviation, selection=req.selection)
        result = forward_tokens(self.rt.lm, cache, prompt_ids[positions], positions, narrow_at=narrow_at,
                                selector=selector)
        stats.prompt_tokens = layout.num_tokens
        stats.recomputed_tokens = len(result.kept_positions)
        if req.mode == "full":
            recomputed_chunk_tokens = layout.num_chunk_tokens
        else:
            recomputed_chunk_tokens = stats.recomputed_tokens - layout.suffix_len
            stats.cached_tokens = layout.prefix_len + layout.num_chunk_tokens - recomputed_chunk_tokens
        stats.recompute_fraction = recomputed_chunk_tokens / max(1, layout.num_chunk_tokens)
        return result.logits

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
                             "selection": req.selection, "model": self.rt.lm.spec,
                             "model_fingerprint": self.rt.lm.fingerprint})

    def close(self) -> None:
        self.rt.close()
