"""VectorIndex: exact flat search, approximate kinds on easy data, persistence, edge cases."""

import warnings

import numpy as np
import pytest

from retriever import VectorIndex

DIM = 32


def unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n, seed, dim=DIM):
    return unit_rows(np.random.default_rng(seed).standard_normal((n, dim)))


def clustered(n, seed, num_clusters=16, noise=0.15):
    """Easy data: points around a few well-separated centers; queries are noisy copies of points."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, DIM))
    points = centers[rng.integers(0, num_clusters, n)] + noise * rng.standard_normal((n, DIM))
    return unit_rows(points)


def brute_force(ids, vecs, queries, k):
    scores = queries.astype(np.float64) @ vecs.astype(np.float64).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), ids[top]


CUSTOM_IDS = np.arange(1000, dtype=np.int64) * 7 + 3


def test_flat_equals_brute_force():
    vecs, queries = random_unit(1000, 0), random_unit(25, 1)
    index = VectorIndex.build(CUSTOM_IDS, vecs)
    scores, ids = index.search(queries, 10)
    want_scores, want_ids = brute_force(CUSTOM_IDS, vecs, queries, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_flat_incremental_adds_equal_one_build():
    vecs, queries = random_unit(300, 2), random_unit(5, 3)
    index = VectorIndex(DIM)
    for start in range(0, 300, 100):
        index.add(CUSTOM_IDS[start:start + 100], vecs[start:start + 100])
    np.testing.assert_array_equal(index.search(queries, 4)[1], brute_force(CUSTOM_IDS[:300], vecs, queries, 4)[1])


@pytest.mark.parametrize("kind, kw", [("hnsw", {}), ("ivf", {"nlist": 8})], ids=["hnsw", "ivf"])
def test_approximate_kinds_agree_on_easy_data(kind, kw):
    vecs = clustered(1000, 4)
    noise = 0.05 * np.random.default_rng(5).standard_normal((100, DIM))
    queries = unit_rows(vecs[:100] + noise)
    index = VectorIndex.build(CUSTOM_IDS, vecs, kind, **kw)
    assert not index.exact_fallback
    top1 = index.search(queries, 1)[1][:, 0]
    agree = np.mean(top1 == brute_force(CUSTOM_IDS, vecs, queries, 1)[1][:, 0])
    assert agree >= 0.9, f"{kind} top-1 agreement {agree:.2f}"


@pytest.mark.parametrize("kind, kw", [("flat", {}), ("hnsw", {}), ("ivf", {"nlist": 8}), ("ivf", {})],
                         ids=["flat", "hnsw", "ivf", "ivf-untrained"])
def test_save_load_round_trip(tmp_path, kind, kw):
    vecs, queries = clustered(400, 6), random_unit(10, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = VectorIndex.build(CUSTOM_IDS[:400], vecs, kind, **kw)
    path = tmp_path / "index.faiss"
    index.save(path)
    assert not (tmp_path / "index.faiss.tmp").exists()
    loaded = VectorIndex.load(path)
    assert (loaded.kind, loaded.dim, loaded.ntotal, loaded.exact_fallback) == (
        kind, DIM, 400, index.exact_fallback)
    for got, want in zip(loaded.search(queries, 5), index.search(queries, 5)):
        np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained ivf index warns again on add
        loaded.add(np.array([5]), random_unit(1, 8))  # still usable
    assert loaded.ntotal == 401


def test_load_without_sidecar_says_rebuild(tmp_path):
    VectorIndex.build(np.arange(3), random_unit(3, 0)).save(tmp_path / "i.faiss")
    (tmp_path / "i.faiss.json").unlink()
    with pytest.raises(FileNotFoundError, match="rebuild the index"):
        VectorIndex.load(tmp_path / "i.faiss")


def test_ivf_with_too_few_vectors_searches_exactly():
    vecs, queries = random_unit(20, 9), random_unit(4, 10)
    index = VectorIndex(DIM, "ivf")
    with pytest.warns(UserWarning, match="too few to train"):
        index.add(CUSTOM_IDS[:20], vecs)
    assert index.exact_fallback
    np.testing.assert_array_equal(index.search(queries, 3)[1], brute_force(CUSTOM_IDS[:20], vecs, queries, 3)[1])


def test_ivf_trains_once_enough_vectors_arrive():
    vecs = clustered(400, 11)
    index = VectorIndex(DIM, "ivf", nlist=8)
    with pytest.warns(UserWarning, match="too few to train 8 lists \\(need 312\\)"):
        index.add(CUSTOM_IDS[:100], vecs[:100])
    index.add(CUSTOM_IDS[100:400], vecs[100:400])
    assert not index.exact_fallback and index.ntotal == 400 and index.nlist == 8
    assert index.search(vecs[150:151], 1)[1][0, 0] == CUSTOM_IDS[150]


@pytest.mark.parametrize("kind, kw", [("flat", {}), ("hnsw", {}), ("ivf", {"nlist": 8, "nprobe": 1})],
                         ids=["flat", "hnsw", "ivf"])
def test_k_larger_than_ntotal_returns_everything_without_padding(kind, kw):
    vecs = clustered(320, 12)
    index = VectorIndex.build(CUSTOM_IDS[:320], vecs, kind, **kw)
    scores, ids = index.search(vecs[:3], 1000)
    assert ids.shape == scores.shape == (3, 320)
    assert (ids >= 0).all()
    for row in ids:
        assert sorted(row.tolist()) == sorted(CUSTOM_IDS[:320].tolist())
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_empty_index_and_single_query():
    index = VectorIndex(DIM)
    scores, ids = index.search(random_unit(2, 0), 5)
    assert scores.shape == ids.shape == (2, 0)
    index.add(np.array([42]), random_unit(1, 1))
    scores, ids = index.search(random_unit(1, 2)[0], 5)
    assert ids.tolist() == [[42]]


def test_misuse_raises_value_error():
    index = VectorIndex.build(np.array([1, 2]), random_unit(2, 0))
    with pytest.raises(ValueError, match="already in the index: \\[2\\]"):
        index.add(np.array([2, 3]), random_unit(2, 1))
    with pytest.raises(ValueError, match="repeat within one add"):
        index.add(np.array([4, 4]), random_unit(2, 1))
    with pytest.raises(ValueError, match="must be >= 0"):
        index.add(np.array([-1]), random_unit(1, 1))
    with pytest.raises(ValueError, match=f"float32 \\[n, {DIM}\\], got shape \\(1, 5\\)"):
        index.search(np.ones((1, 5), np.float32), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(random_unit(1, 0), 0)
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        VectorIndex(DIM, "lsh")
    assert index.ntotal == 2
