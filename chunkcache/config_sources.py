"""Settings from the environment and a TOML file (pydantic-settings), for the CLI and the server.

Every `ChunkCacheConfig` field, and the server's plain settings, can come from
  - an environment variable `CHUNKCACHE_<FIELD>` (e.g. `CHUNKCACHE_TOP_K=8`, `CHUNKCACHE_MAX_RUNNING=4`), or
  - a TOML file (`chunkcache --config FILE ...`, else `$CHUNKCACHE_CONFIG`): pipeline fields under
    `[pipeline]`, server fields under `[server]`. Lists in the environment are JSON
    (`CHUNKCACHE_CORS_ORIGINS='["https://app.example"]'`).

Order of precedence, highest first:
  1. command-line flags (and, in Python, `RAGPipeline.open(**overrides)`);
  2. for the settings that shape stored tensors (model, kv_dtype, chunk_tokens, ...), an existing store's
     manifest (a flag that contradicts it is refused);
  3. `CHUNKCACHE_<FIELD>` environment variables;
  4. the TOML file;
  5. the defaults.
So a shared file may set `kv_dtype` for new stores without breaking stores built otherwise.
API keys keep their own variables (`CHUNKCACHE_API_KEYS`, `CHUNKCACHE_ADMIN_KEY`); `CHUNKCACHE_HOME` and
`CHUNKCACHE_STORE` are the cache and default store directories.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError, create_model
from pydantic_settings import (BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from .config import ChunkCacheConfig

CONFIG_ENV = "CHUNKCACHE_CONFIG"
ENV_PREFIX = "CHUNKCACHE_"
# The server's settings a file or the environment may set (keys and limits have their own flags).
SERVER_FIELDS = {"shared_cache": bool, "model_name": str, "max_pending": int, "public_metrics": bool,
                 "cors_origins": list[str]}


class SettingsError(ValueError):
    """A setting in the environment or the TOML file is unknown or has a bad value; the message names it."""


@dataclass
class Sources:
    config: dict[str, Any]  # ChunkCacheConfig fields
    server: dict[str, Any]  # ServerSettings fields


def load_sources(path: str | os.PathLike | None = None) -> Sources:
    """The settings that the environment and the TOML file (`path`, else $CHUNKCACHE_CONFIG) set, validated."""
    path = path or os.environ.get(CONFIG_ENV) or None
    tables: set[str] = set()
    if path is not None:
        if not Path(path).is_file():
            raise SettingsError(f"no settings file at {path} (--config or ${CONFIG_ENV})")
        try:
            tables = set(tomllib.loads(Path(path).read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path} is not valid TOML: {exc}") from None
        unknown = tables - {"pipeline", "server"}
        if unknown:
            raise SettingsError(f"{path}: unknown table(s) or key(s) {sorted(unknown)}; settings go under [pipeline] "
                                "and [server]")
    config = _load(_PipelineSettings, path if "pipeline" in tables else None, ("pipeline",))
    if "chunk_scale" in config:
        config["chunk_scale"] = _chunk_scale(config["chunk_scale"])
    try:
        ChunkCacheConfig(**config)
    except ValueError as exc:
        raise SettingsError(f"{_origin(path)}: {exc}") from None
    server = _load(_ServerSettings, path if "server" in tables else None, ("server",))
    if "cors_origins" in server:
        server["cors_origins"] = tuple(server["cors_origins"])
    return Sources(config, server)


def _load(model: type[BaseSettings], path, table: tuple[str, ...]) -> dict[str, Any]:
    class Loaded(model):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
            if path is None:
                return (env_settings,)
            return env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path, toml_table_header=table)

    try:
        return Loaded().model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"bad settings in {_origin(path)}: {problems}") from None


def _origin(path) -> str:
    return f"the environment ({ENV_PREFIX}*)" + (f" or {path}" if path else "")


def _chunk_scale(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value  # "calibrated" or "off"; anything else is refused by ChunkCacheConfig


class _Base(BaseSettings):
    # Unknown names in the file are refused; CHUNKCACHE_* variables that are not settings are left alone.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)


def _optional(annotation) -> Any:
    return typing.Optional[annotation]


_hints = typing.get_type_hints(ChunkCacheConfig)
_PipelineSettings = create_model("PipelineSettings", __base__=_Base,
                                 **{f.name: (_optional(_hints[f.name]), None)
                                    for f in dataclasses.fields(ChunkCacheConfig)})
_ServerSettings = create_model("ServerFileSettings", __base__=_Base,
                               **{name: (_optional(kind), None) for name, kind in SERVER_FIELDS.items()})
