"""chunkcache: precomputed chunk KV caches for RAG, reused at any position with selective recompute."""
from .answer import Answer, CacheStats, Source, Timings
from .config import ChunkCacheConfig
from .pipeline import QueryError, RAGPipeline

__all__ = ["Answer", "CacheStats", "ChunkCacheConfig", "QueryError", "RAGPipeline", "Source", "Timings"]
