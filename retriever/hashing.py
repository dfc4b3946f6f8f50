"""A bag-of-words hashing embedder: no model, deterministic, instant.

For tests and for machines that hold no sentence-transformers model (the GPU benchmark's), where
retrieval by word overlap is enough. It has `Embedder`'s interface: name, fingerprint, dim, encode.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np


class HashingEmbedder:
    """Each word adds 1 to one of `dim` buckets (md5 of the lower-cased word); rows are L2-normalised."""

    name = "hash-bow-64"
    fingerprint = "hash-bow-64-v1"
    dim = 64

    def encode(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)
