"""The server's one settings object: limits, API keys and tenancy.

`ServerSettings.from_args` translates CLI flags and the environment (CHUNKCACHE_API_KEYS,
CHUNKCACHE_ADMIN_KEY) into it;
nothing else in the server reads flags or environment variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

API_KEYS_ENV = "CHUNKCACHE_API_KEYS"
ADMIN_KEY_ENV = "CHUNKCACHE_ADMIN_KEY"


@dataclass(frozen=True)
class Limits:
    """Bounds on every request field; the request models (and so the OpenAPI schema) are built from them."""

    # A bound on the work before tokenizing; whether the prompt fits is then checked in tokens against
    # the model's context (a 422 says by how much it does not).
    max_question_chars: int = 100_000
    max_new_tokens: int = 2048
    max_top_k: int = 32
    max_documents: int = 64  # the pipeline's own cap (pipeline.MAX_DOCUMENTS)
    max_document_chars: int = 20_000
    max_logprobs: int = 20  # the pipeline's own cap (pipeline.MAX_LOGPROBS)
    max_messages: int = 256
    max_choices: int = 8  # `n`: choices per chat request, decoded together by the engine
    max_check_layer: int = 1024
    max_temperature: float = 2.0
    max_body_bytes: int = 2 * 1024 * 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"limit {name} must be > 0, got {value}")


@dataclass(frozen=True)
class ServerSettings:
    """Everything the HTTP layer decides on its own (the pipeline's settings live in ChunkCacheConfig).

    Attributes:
        api_keys: key -> tenant (None: the store's own namespace). Empty: no authentication.
        shared_cache: every tenant uses the store's namespace, so tenants hit each other's chunks.
        model_name: the id reported by /v1/models (default: the pipeline's model spec).
        max_pending: requests admitted to wait for or use the model at once; more get 503.
        public_metrics: serve /metrics without a key even when keys are configured.
        cors_origins: browser origins allowed to call the API (CORS); "*" for any. Empty: no CORS headers.
        admin_key: the bearer key for /metrics (global figures across tenants). When any key is configured,
            /metrics needs this one; an API key is not enough. It is not an API key itself.
    """

    api_keys: Mapping[str, str | None] = field(default_factory=dict)
    shared_cache: bool = False
    limits: Limits = field(default_factory=Limits)
    model_name: str | None = None
    max_pending: int = 32
    public_metrics: bool = False
    admin_key: str | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")
        empty = [k for k in self.api_keys if not k]
        if empty:
            raise ValueError("an API key is empty; give non-empty keys (KEY or KEY:TENANT)")
        if self.admin_key is not None and not self.admin_key.strip():
            raise ValueError(f"the admin key is empty; set {ADMIN_KEY_ENV} (or --admin-key) to a non-empty value")
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ValueError("the admin key is also an API key; give the admin key a value of its own")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def metrics_need_admin(self) -> bool:
        """/metrics shows every tenant's traffic: with any key configured, only the admin key reads it."""
        return (bool(self.api_keys) or self.admin_key is not None) and not self.public_metrics

    @classmethod
    def from_args(cls, args, environ: Mapping[str, str] = os.environ,
                  base: Mapping[str, object] | None = None) -> "ServerSettings":
        """From `chunkcache serve` flags (api_keys, shared_cache, max_body_bytes, model_name, admin_key where
        the CLI has them), CHUNKCACHE_API_KEYS and CHUNKCACHE_ADMIN_KEY, over `base` (settings from the
        environment and the settings file, chunkcache/config_sources.py). API keys from both places are
        merged, the --admin-key flag wins over the environment, and a flag given wins over `base`."""
        base = dict(base or {})
        keys = dict(parse_api_keys(environ.get(API_KEYS_ENV, "")))
        for item in getattr(args, "api_keys", None) or ():
            keys.update(parse_api_keys(item))
        limits = Limits()
        if getattr(args, "max_body_bytes", None):
            limits = Limits(**{**vars(limits), "max_body_bytes": args.max_body_bytes})
        admin_key = getattr(args, "admin_key", None) or environ.get(ADMIN_KEY_ENV) or None
        flags = {"shared_cache": getattr(args, "shared_cache", False) or None,
                  "model_name": getattr(args, "model_name", None),
                  "cors_origins": tuple(getattr(args, "cors_origins", None) or ()) or None}
        chosen = {**base, **{k: v for k, v in flags.items() if v is not None}}
        return cls(api_keys=keys, limits=limits, admin_key=admin_key, **chosen)


def parse_api_keys(text: str) -> dict[str, str | None]:
    """'key1,key2:tenant' -> {'key1': None, 'key2': 'tenant'}; blanks between commas are skipped."""
    keys: dict[str, str | None] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, tenant = item.partition(":")
        key, tenant = key.strip(), tenant.strip()
        if not key or (sep and not tenant):
            raise ValueError(f"bad API key entry {_redact(item)!r}: write KEY or KEY:TENANT")
        keys[key] = tenant or None
    return keys


def _redact(item: str) -> str:
    key, sep, tenant = item.partition(":")
    return (key[:2] + "***") + sep + tenant
