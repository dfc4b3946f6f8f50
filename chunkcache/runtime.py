"""Everything a store is used with: config, model, embedder, prompt template and the store itself.

`Runtime.open` is the one place that decides which models and settings a store is opened with:
an existing store's manifest wins, overrides that would change its tensors are refused.
"""
from __future__ import annotations

import datetime
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from store import KV_FORMAT_VERSION, chunk_key

from .config import LEGACY_STORE_VALUES, ChunkCacheConfig
from .kvcompute import kv_dtype_of, prefix_cache
from .models import LoadedModel, load_model
from .openmp import in_passing_thread
from .prompt import PromptTemplate, build_template
from .storedir import ChunkStore

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: ChunkCacheConfig
    lm: LoadedModel
    embedder: object  # retriever.Embedder
    template: PromptTemplate
    store: ChunkStore
    # Held by whoever runs the model (the engine, one step at a time; ingest; the benchmark's direct
    # calls): the layer loop mutates per-request caches but shares the model's modules and thread pool.
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Requests' own system prompts: their templates and prefix KVs, most recently used last. Kept in
    # memory only, so that no request can grow the store with prompts (docs/SECURITY.md).
    _templates: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _prefix_kvs: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, store_dir, config: ChunkCacheConfig | None = None, *, lm: LoadedModel | None = None,
             embedder=None, **overrides) -> "Runtime":
        """Open (or create) the store at `store_dir` with the models and settings it was built with.

        Args:
            store_dir: the store directory; created with the default (or given) models if missing or empty.
            config: base settings (default: ChunkCacheConfig()).
            lm, embedder: already-loaded models to use instead of loading `config.model` / `config.embedder`.
            overrides: ChunkCacheConfig fields; for an existing store these may not change what its tensors hold.
        """
        store = ChunkStore(store_dir)
        try:
            # On a thread that then exits: loading leaves no OpenMP team beside the engine's (chunkcache/openmp.py).
            runtime = in_passing_thread(lambda: cls._open(store, config, lm, embedder, overrides))
        except BaseException:
            store.close()  # nobody else holds it: release the environment (or the Redis connections)
            raise
        if runtime.config.threads:  # here too: a thread that ran torch before keeps its own count otherwise
            torch.set_num_threads(runtime.config.threads)
        return runtime

    @classmethod
    def _open(cls, store: ChunkStore, config, lm, embedder, overrides) -> "Runtime":
        config = (config or ChunkCacheConfig()).replace(**overrides)
        manifest = store.manifest
        if manifest is not None:
            recorded = LEGACY_STORE_VALUES | {k: manifest[k] for k in ChunkCacheConfig.STORE_FIELDS if k in manifest}
            changed = {k: v for k, v in overrides.items() if k in recorded and recorded[k] != v
                       and k not in ("model", "embedder")}
            if changed:
                raise ValueError(f"store {store.path} was built with {({k: recorded[k] for k in changed})}; "
                                 f"these settings cannot be overridden for it (asked: {changed})")
            config = config.replace(**{k: v for k, v in recorded.items() if k not in overrides})
            if "max_store_bytes" not in overrides and manifest.get("max_store_bytes") is not None:
                config = config.replace(max_store_bytes=manifest["max_store_bytes"])
        store.kv.max_kv_bytes = config.max_store_bytes
        if config.threads:
            torch.set_num_threads(config.threads)
        if lm is None:
            lm = load_model(config.model, device=config.device, compute_dtype=config.compute_dtype,
                            linear_dtype=config.linear_dtype)
        config = config.replace(linear_dtype=lm.linear_dtype)  # what applies (float32 on a GPU, say)
        if embedder is None:
            from retriever import Embedder
            embedder = Embedder(config.embedder)
        runtime = cls(config, lm, embedder, build_template(lm.tokenizer, config.system_prompt, config.instruction),
                      store)
        expected = runtime.expected_manifest()
        store.check_manifest(expected)
        if manifest is None:
            store.write_manifest(expected)
        return runtime

    @property
    def kv_dtype(self) -> torch.dtype:
        return kv_dtype_of(self.config.kv_dtype)

    def expected_manifest(self) -> dict:
        return {
            "format_version": KV_FORMAT_VERSION,
            "model": self.lm.spec,
            "model_fingerprint": self.lm.fingerprint,
            "embedder": getattr(self.embedder, "name", self.config.embedder),
            "embedder_fingerprint": self.embedder.fingerprint,
            "embedding_dim": self.embedder.dim,
            "kv_dtype": self.config.kv_dtype,
            "chunk_tokens": self.config.chunk_tokens,
            "system_prompt": self.config.system_prompt,
            "instruction": self.config.instruction,
            "prefix_hash": self.template.prefix_hash,
            "index_kind": self.config.index_kind,
            "linear_dtype": self.lm.linear_dtype,
            "chunk_context": self.config.chunk_context,
            "max_store_bytes": self.config.max_store_bytes,
            "num_layers": self.lm.num_layers,
            "num_kv_heads": self.lm.num_kv_heads,
            "head_dim": self.lm.head_dim,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def key_for(self, token_ids, namespace: str | None = None, context_ids=()) -> bytes:
        """The store key of a chunk computed after this runtime's prefix (and `context_ids` after it)."""
        ns = self.config.namespace if namespace is None else namespace
        return chunk_key(self.lm.fingerprint, self.template.prefix_ids, token_ids,
                         kv_dtype=self.config.kv_dtype, namespace=ns, context_ids=context_ids)

    def template_for(self, system_prompt: str | None) -> PromptTemplate:
        """The prompt template under a request's own system prompt (None, or the store's: the store's)."""
        if system_prompt is None or system_prompt == self.config.system_prompt:
            return self.template
        with self._memo_lock:
            template = self._templates.pop(system_prompt, None)
        if template is None:
            template = build_template(self.lm.tokenizer, system_prompt, self.config.instruction, trusted=False)
        with self._memo_lock:
            _remember(self._templates, system_prompt, template)
        return template

    def request_prefix_kv(self, template: PromptTemplate, namespace: str) -> tuple[torch.Tensor, bool]:
        """(KV [2, layers, kv_heads, n, head_dim] of a request's own prefix, computed after nothing, and
        whether it was already in memory). Kept per namespace: one tenant's prompt is never another's hit."""
        memo = (namespace, template.prefix_ids)
        with self._memo_lock:
            kv = self._prefix_kvs.pop(memo, None)
        hit = kv is not None
        if kv is None:
            ids = list(template.prefix_ids)
            cache = prefix_cache(self.lm, ids, len(ids))
            kv = torch.stack((cache.k[:, :, :len(ids)], cache.v[:, :, :len(ids)]))
        with self._memo_lock:
            _remember(self._prefix_kvs, memo, kv)
        return kv, hit

    def prefix_key(self) -> bytes:
        # The prefix is computed after nothing; it is shared by every namespace (it holds no user data).
        return chunk_key(self.lm.fingerprint, (), self.template.prefix_ids, kv_dtype=self.config.kv_dtype)

    @property
    def store_path(self) -> Path:
        return self.store.path

    def close(self) -> None:
        self.store.close()


MAX_REQUEST_PREFIXES = 32  # custom system prompts remembered (templates and prefix KVs, each)


def _remember(memo: OrderedDict, key, value) -> None:
    memo[key] = value
    while len(memo) > MAX_REQUEST_PREFIXES:
        memo.popitem(last=False)
