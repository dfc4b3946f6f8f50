"""chunkcache retriever: sentence embedder and Faiss vector index over the store's chunk ids."""

from .embedder import Embedder, default_embedder_path
from .index import VectorIndex

__all__ = ["Embedder", "VectorIndex", "default_embedder_path"]
