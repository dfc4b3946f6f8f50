"""Prometheus metrics, one registry per `Metrics` object (never the process-global registry), so tests
and several apps in one process each count their own."""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..answer import Answer

# Seconds: TTFT on the default model runs from ~10 ms (all chunks cached) to seconds (full prefill on CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Inter-token latency: ~60 ms a token alone on 2 CPU threads, more in a big batch or behind a long prefill piece.
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Request and cache counters in Prometheus text format, names prefixed `chunkcache_`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("chunkcache_requests", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"), registry=r)
        self.latency = Histogram("chunkcache_request_duration_seconds",
                                 "HTTP request latency, to the last byte (streams included)", ("endpoint",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("chunkcache_ttft_seconds", "Time to first token: retrieval, KV loading and prefill",
                              ("mode",), buckets=TTFT_BUCKETS, registry=r)
        self.queries = Counter("chunkcache_queries", "Answered queries by mode", ("mode",), registry=r)
        self.chunk_hits = Counter("chunkcache_chunk_hits", "Chunks whose KV was read from the store", registry=r)
        self.chunk_misses = Counter("chunkcache_chunk_misses", "Chunks whose KV was computed for the request",
                                    registry=r)
        self.reused_tokens = Counter("chunkcache_reused_tokens", "Prompt tokens whose cached KV was reused",
                                     registry=r)
        self.recomputed_tokens = Counter("chunkcache_recomputed_tokens",
                                         "Prompt tokens computed through the last layer (suffix included)",
                                         registry=r)
        self.prompt_tokens = Counter("chunkcache_prompt_tokens", "Prompt tokens", registry=r)
        self.damaged_entries = Counter("chunkcache_damaged_entries",
                                       "Stored KV entries that failed their checksum: recomputed and rewritten",
                                       registry=r)
        self.unstored_chunks = Counter("chunkcache_unstored_chunks",
                                       "Request documents computed for the request only, not stored: their tenant "
                                       "was over its document quota, or documents are not persisted", registry=r)
        self.context_chunks = Counter("chunkcache_context_chunks",
                                      "Chunks placed from their context-enriched entry (chunk_context neighbour)",
                                      registry=r)
        self.store_unavailable = Counter("chunkcache_store_unavailable_requests",
                                         "Requests served while the shared store (Redis) was unreachable: what "
                                         "they could not read was computed locally", registry=r)
        self.cancelled = Counter("chunkcache_cancelled_requests",
                                 "Requests stopped because their client left (before the model, while decoding, "
                                 "or mid-stream)", registry=r)
        self.completion_tokens = Counter("chunkcache_completion_tokens", "Generated tokens", registry=r)
        # The engine (continuous batching), in the names vLLM's dashboards and autoscalers use.
        self.running = Gauge("chunkcache_num_requests_running", "Requests admitted by the engine: prefilling or "
                             "decoding", registry=r)
        self.waiting = Gauge("chunkcache_num_requests_waiting", "Requests queued for the engine", registry=r)
        self.kv_bytes = Gauge("chunkcache_kv_cache_bytes", "KV cache memory held by the admitted requests",
                              registry=r)
        self.kv_allocated = Gauge("chunkcache_kv_cache_allocated_bytes", "KV cache memory allocated: the engine's "
                                  "whole pool (free slots included; given back after 2 s idle)", registry=r)
        self.queue_time = Histogram("chunkcache_request_queue_time_seconds", "Time a request waited for the engine",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("chunkcache_inter_token_latency_seconds",
                             "Time between a request's generated tokens (its mean over the answer)",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("chunkcache_e2e_request_latency_seconds", "Submission to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        if registry is None:  # the standard process_* and python_* series (the global registry has them already)
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_answer(self, answer: Answer) -> None:
        s = answer.stats
        self.queries.labels(s.mode).inc()
        self.ttft.labels(s.mode).observe(answer.ttft_s)
        self.chunk_hits.inc(s.chunk_hits)
        self.chunk_misses.inc(s.chunk_misses)
        self.reused_tokens.inc(s.cached_tokens)
        self.recomputed_tokens.inc(s.recomputed_tokens)
        self.prompt_tokens.inc(s.prompt_tokens)
        self.damaged_entries.inc(s.damaged_chunks)
        self.unstored_chunks.inc(s.unstored_chunks)
        self.context_chunks.inc(s.context_chunks)
        self.store_unavailable.inc(int(s.store_unavailable))
        self.completion_tokens.inc(s.completion_tokens)
        self.queue_time.observe(answer.timings.queue_s)
        self.e2e.observe(answer.total_s)
        if s.completion_tokens > 1 and answer.ttft_s is not None:
            self.itl.observe((answer.total_s - answer.ttft_s) / (s.completion_tokens - 1))

    def observe_engine(self, counts) -> None:
        """The engine's gauges, read when /metrics is scraped (`counts`: chunkcache.engine.EngineCounts)."""
        self.running.set(counts.running)
        self.waiting.set(counts.waiting)
        self.kv_bytes.set(counts.kv_bytes)
        self.kv_allocated.set(counts.kv_allocated_bytes)

    def observe_cancelled(self) -> None:
        self.cancelled.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class NoMetrics:
    """Counts nothing: the same calls as `Metrics`, for A/B runs and embedding without Prometheus."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        pass

    def observe_answer(self, answer: Answer) -> None:
        pass

    def observe_cancelled(self) -> None:
        pass

    def observe_engine(self, counts) -> None:
        pass

    def render(self) -> bytes:
        return b""
