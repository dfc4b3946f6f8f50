"""chunkcache: precomputed chunk KV caches for RAG, reused at any position with selective recompute."""
from . import openmp  # noqa: F401  (first: its settings must reach libgomp before torch loads it)
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("chunkcache")
except PackageNotFoundError:  # run from a checkout without installing
    __version__ = "0+unknown"

from .answer import Answer, CacheStats, Source, Timings
from .config import ChunkCacheConfig
from .pipeline import QueryError, RAGPipeline

__all__ = ["__version__", "Answer", "CacheStats", "ChunkCacheConfig", "QueryError", "RAGPipeline", "Source", "Timings"]
