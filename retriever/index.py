"""Faiss inner-product index over L2-normalized vectors (cosine), keyed by the store's int64 chunk ids."""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib

import faiss
import numpy as np

KINDS = ("flat", "hnsw", "ivf")
SIDECAR_FORMAT = 1
MIN_POINTS_PER_LIST = 39  # Faiss k-means warns (and clusters poorly) below this many training points per list
IVF_MIN_TRAIN_POINTS = 1000  # with the default nlist: below this, exact search is as fast as IVF anyway
HNSW_EF_SEARCH = 64


def default_nlist(num_vectors: int) -> int:
    """IVF list count for `num_vectors` training vectors: ~4*sqrt(n), with >= 39 points per list."""
    return max(1, min(round(4 * math.sqrt(num_vectors)), num_vectors // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists visited per IVF query: ~sqrt(nlist), a usual recall/speed balance."""
    return max(1, round(math.sqrt(nlist)))


class VectorIndex:
    """Cosine top-k over normalized vectors; ids are the store's chunk ids.

    Kinds: "flat" (exact), "hnsw" (graph, approximate), "ivf" (inverted lists, approximate; trained on the
    first add with enough vectors, exact search until then: see `exact_fallback`). The index is derived data:
    rebuild it from `KVStore.embeddings()` whenever in doubt.
    """

    def __init__(self, dim: int, kind: str = "flat", *, nlist: int | None = None, hnsw_m: int = 32,
                 nprobe: int | None = None):
        """Create an empty index.

        Args:
            dim: vector dimension.
            kind: "flat", "hnsw" or "ivf".
            nlist: IVF list count (default: `default_nlist` of the training set size; fixed once trained).
            hnsw_m: HNSW graph degree.
            nprobe: IVF lists searched per query (default: `default_nprobe(nlist)`).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; use one of {KINDS}")
        if dim < 1:
            raise ValueError(f"index dim must be >= 1, got {dim}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        if hnsw_m < 2:
            raise ValueError(f"hnsw_m must be >= 2, got {hnsw_m}")
        self.dim = dim
        self.kind = kind
        self.nlist = nlist
        self.hnsw_m = hnsw_m
        self.nprobe = nprobe
        self._trained = kind != "ivf"
        self._warned = False
        self.extra: dict = {}  # caller's bookkeeping saved in the sidecar (e.g. the store's id watermark)
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efSearch = HNSW_EF_SEARCH
            self._index = faiss.IndexIDMap2(hnsw)
        else:  # flat, and ivf until it is trained
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return self._index.ntotal

    def ids(self) -> np.ndarray:
        """int64 [ntotal]: the ids held, in insertion order."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    @property
    def exact_fallback(self) -> bool:
        """True while an "ivf" index has too few vectors to train and searches exactly instead."""
        return not self._trained

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors under the given ids.

        Args:
            ids: int64 [n] chunk ids, non-negative, unique and not already in the index.
            vecs: float32 [n, dim], L2-normalized rows (the Embedder's output).
        """
        vecs = self._check_vecs(vecs)
        ids = self._check_ids(ids, len(vecs))
        if len(ids) == 0:
            return
        self._index.add_with_ids(vecs, ids)
        if not self._trained:
            self._maybe_train()

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product.

        Args:
            vecs: float32 [q, dim] (or [dim] for one query), normalized.
            k: results wanted per query.

        Returns:
            scores float32 [q, k'], ids int64 [q, k'], best first, k' = min(k, ntotal); never -1 padded.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = self._check_vecs(np.atleast_2d(vecs))
        k_eff = min(k, self.ntotal)
        if k_eff == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = max(HNSW_EF_SEARCH, k_eff)
        scores, ids = self._index.search(queries, k_eff)
        short = (ids < 0).any(axis=1)
        if short.any():
            # An approximate search found fewer than k' vectors for these queries: redo them exhaustively.
            scores[short], ids[short] = self._exhaustive_search(queries[short], k_eff)
        assert (ids >= 0).all(), f"search returned -1 ids for k'={k_eff}, ntotal={self.ntotal}"
        return scores, ids

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to `path` and its settings (with `extra`) to `path + ".json"`, each atomically
        (tmp + rename). On failure (e.g. a full disk) the temporary files are removed and the error raised.

        Args:
            path: index file path.
        """
        path = os.fspath(path)
        sidecar = {
            "format": SIDECAR_FORMAT, "kind": self.kind, "dim": self.dim, "nlist": self.nlist,
            "hnsw_m": self.hnsw_m, "nprobe": self.nprobe, "trained": self._trained, "ntotal": self.ntotal,
            "extra": self.extra,
        }
        try:
            data = faiss.serialize_index(self._index).tobytes()
            # A checksum lets `load` refuse a damaged file before Faiss parses it (Faiss trusts its sizes).
            sidecar["crc32"] = zlib.crc32(data)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
            with open(path + ".json.tmp", "w") as f:
                json.dump(sidecar, f)
            os.replace(path + ".json.tmp", path + ".json")
        except BaseException:
            for tmp in (path + ".tmp", path + ".json.tmp"):
                if os.path.exists(tmp):
                    os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VectorIndex":
        """Read an index written by `save`.

        Args:
            path: index file path (its ".json" sidecar must sit beside it).

        Returns:
            the index.
        """
        path = os.fspath(path)
        try:
            with open(path + ".json") as f:
                sidecar = json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"no index settings at {path}.json; rebuild the index from the store (`VectorIndex.build`)"
            ) from e
        if sidecar.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"index at {path} has sidecar format {sidecar.get('format')}; rebuild it from the store")
        index = cls(sidecar["dim"], sidecar["kind"], nlist=sidecar["nlist"], hnsw_m=sidecar["hnsw_m"],
                    nprobe=sidecar["nprobe"])
        with open(path, "rb") as f:
            data = f.read()
        if "crc32" in sidecar and zlib.crc32(data) != sidecar["crc32"]:
            raise ValueError(f"index at {path} fails its checksum (damaged or not the file its sidecar describes); "
                             "rebuild it from the store")
        index._index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        index._trained = sidecar["trained"]
        index.extra = dict(sidecar.get("extra") or {})
        if index._index.d != index.dim or index._index.ntotal != sidecar["ntotal"]:
            raise ValueError(
                f"index at {path} does not match its sidecar (dim {index._index.d} vs {index.dim}, ntotal "
                f"{index._index.ntotal} vs {sidecar['ntotal']}); rebuild it from the store"
            )
        if index.kind == "ivf" and index._trained:
            faiss.extract_index_ivf(index._index).nprobe = index.nprobe
        return index

    @classmethod
    def build(cls, ids: np.ndarray, vecs: np.ndarray, kind: str = "flat", **kw) -> "VectorIndex":
        """An index holding `vecs` under `ids` (e.g. from `KVStore.embeddings()`).

        Args:
            ids: int64 [n].
            vecs: float32 [n, dim].
            kind, **kw: as for `VectorIndex(...)`.

        Returns:
            the index.
        """
        vecs = np.asarray(vecs)
        if vecs.ndim != 2 or vecs.shape[1] < 1:
            raise ValueError(f"build needs vectors shaped [n, dim], got {vecs.shape}")
        index = cls(vecs.shape[1], kind, **kw)
        index.add(ids, vecs)
        return index

    # ---- internals

    def _maybe_train(self) -> None:
        """Move an "ivf" index from exact fallback to trained lists once it holds enough vectors."""
        n = self.ntotal
        nlist = self.nlist or default_nlist(n)
        need = MIN_POINTS_PER_LIST * nlist if self.nlist else IVF_MIN_TRAIN_POINTS
        if n < need:
            if not self._warned:
                warnings.warn(
                    f"VectorIndex(kind='ivf'): {n} vectors are too few to train {nlist} lists (need {need}); "
                    "searching exactly until then", stacklevel=3,
                )
                self._warned = True
            return
        vecs = self._index.index.reconstruct_n(0, n)
        ids = faiss.vector_to_array(self._index.id_map)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(vecs)
        ivf.nprobe = self.nprobe = self.nprobe or default_nprobe(nlist)
        self.nlist = nlist
        index = faiss.IndexIDMap2(ivf)
        index.add_with_ids(vecs, ids)
        self._index = index
        self._trained = True

    def _exhaustive_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "ivf":
            ivf = faiss.extract_index_ivf(self._index)
            nprobe, ivf.nprobe = ivf.nprobe, ivf.nlist
            try:
                return self._index.search(queries, k)
            finally:
                ivf.nprobe = nprobe
        vecs = self._index.index.reconstruct_n(0, self.ntotal)
        all_ids = faiss.vector_to_array(self._index.id_map)
        scores = queries @ vecs.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, axis=1), all_ids[top]

    def _check_vecs(self, vecs: np.ndarray) -> np.ndarray:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"vectors must be float32 [n, {self.dim}], got shape {vecs.shape}")
        if not np.isfinite(vecs).all():
            raise ValueError("vectors contain NaN or inf; check the embedder output")
        return vecs

    def _check_ids(self, ids: np.ndarray, num_vecs: int) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) != num_vecs or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"ids must be integers [{num_vecs}] matching the vectors, got {ids.dtype} {ids.shape}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if (ids < 0).any():
            raise ValueError("ids must be >= 0 (Faiss uses -1 for 'no result')")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids repeat within one add(); each chunk id may appear once")
        present = np.intersect1d(ids, faiss.vector_to_array(self._index.id_map))
        if present.size:
            raise ValueError(
                f"ids already in the index: {present[:8].tolist()}{' ...' if present.size > 8 else ''}; add only "
                "new chunks (put_chunks returns existing ids for deduplicated keys)"
            )
        return ids
