"""Embedder: the default MiniLM loads offline and gives normalized, meaningful vectors."""

import os
import socket

import numpy as np
import pytest

from retriever import Embedder, default_embedder_path
from retriever.embedder import dir_fingerprint


@pytest.fixture(scope="module")
def embedder():
    def no_network(*args, **kwargs):
        raise AssertionError(f"the embedder tried to reach the network: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "getaddrinfo", no_network)
        emb = Embedder()
        assert "HF_HUB_OFFLINE" not in os.environ  # set only while loading
    return emb


def test_default_model_shape_and_norm(embedder):
    vecs = embedder.encode(["The cat sat on the mat.", "Paris is the capital of France.", ""])
    assert embedder.dim == 384 and embedder.name == "default"
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_paraphrase_scores_above_unrelated(embedder):
    query, paraphrase, unrelated = embedder.encode([
        "How do I reset my password?",
        "What are the steps to change my login password?",
        "The recipe needs two cups of flour and an egg.",
    ])
    assert query @ paraphrase > query @ unrelated + 0.2


def test_encode_is_deterministic_and_batch_independent(embedder):
    texts = [f"sentence number {i}" for i in range(5)]
    np.testing.assert_allclose(embedder.encode(texts)[2], embedder.encode(texts[2:3])[0], atol=1e-5)


def test_empty_input_and_single_string(embedder):
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="wrap it in a list"):
        embedder.encode("one string")


def test_fingerprint_is_the_model_directory_fingerprint(embedder):
    assert embedder.fingerprint == dir_fingerprint(default_embedder_path())
    assert len(embedder.fingerprint) == 32


def test_dir_fingerprint_tracks_configs_and_weight_sizes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "config.json").write_text('{"hidden": 384}')
        (d / "sub" / "model.safetensors").write_bytes(b"\0" * 10)
    (b / ".cache").mkdir()
    (b / ".cache" / "lock").write_text("ignored")
    assert dir_fingerprint(a) == dir_fingerprint(b)  # location and hidden files do not matter
    (b / "sub" / "model.safetensors").write_bytes(b"\1" * 10)
    assert dir_fingerprint(a) == dir_fingerprint(b)  # weights: names and sizes only
    (b / "sub" / "model.safetensors").write_bytes(b"\1" * 11)
    assert dir_fingerprint(a) != dir_fingerprint(b)
    (b / "sub" / "model.safetensors").write_bytes(b"\0" * 10)
    (b / "config.json").write_text('{"hidden": 385}')
    assert dir_fingerprint(a) != dir_fingerprint(b)


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Embedder(str(tmp_path / "no-such-model"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(RuntimeError, match="not a local directory.*local HF cache"):
        Embedder("chunkcache-test/no-such-model")
