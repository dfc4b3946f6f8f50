"""Shared fixtures: a tiny random-init Llama-style model with the real SmolLM2 tokenizer, and a
deterministic bag-of-words embedder, so pipeline tests run in seconds without any download."""
from __future__ import annotations

import chunkcache  # noqa: F401  (before torch: chunkcache/openmp.py tunes OpenMP for the engine thread)
import pytest
import torch

TINY_LAYERS = 4


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from chunkcache.models import default_gguf_path

    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _bf16_linears() -> bool:
    from chunkcache.cpu_linear import onednn_bf16_available

    return onednn_bf16_available()


# bf16 packed linears need oneDNN's bf16 products (AVX-512 BW/VL/DQ or AMX); elsewhere loading refuses them.
needs_bf16_linears = pytest.mark.skipif(not _bf16_linears(), reason="no oneDNN bf16 products on this CPU")


def make_tiny_lm(tokenizer, *, seed: int = 0, layers: int = TINY_LAYERS, rope_parameters=None, model_type="llama",
                 linear_dtype: str = "float32"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from chunkcache.models import prepare_model

    kwargs = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    if rope_parameters is not None:
        kwargs["rope_parameters"] = rope_parameters
    config = LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init with std 0.02 gives near-uniform attention; larger weights make positions and
    # context matter, so the exactness tests can tell right from wrong.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return prepare_model(model, tokenizer, spec=f"tiny-random-{seed}", device=torch.device("cpu"),
                         linear_dtype=linear_dtype)


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):
    return make_tiny_lm(tokenizer)


@pytest.fixture(scope="session")
def hash_embedder():
    from retriever.hashing import HashingEmbedder

    return HashingEmbedder()


def open_tiny_pipe(directory, lm, embedder, **overrides):
    """A pipeline with the tests' settings: float32 KV (exact comparisons), 48-token chunks, short answers."""
    from chunkcache import RAGPipeline

    settings = dict(kv_dtype="float32", chunk_tokens=48, max_new_tokens=8) | overrides
    return RAGPipeline.open(directory / "store", lm=lm, embedder=embedder, **settings)


def wait_until_idle(pipe, seconds: float, why: str) -> None:
    """Wait for the pipeline's engine to run nothing (e.g. after a client left); fail with `why` after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while pipe.engine.counts().running:
        assert time.monotonic() < deadline, why
        time.sleep(0.02)
    assert pipe.engine.counts().kv_bytes == 0


@pytest.fixture
def tiny_pipe(tmp_path, tiny_lm, hash_embedder):
    pipe = open_tiny_pipe(tmp_path, tiny_lm, hash_embedder)
    yield pipe
    pipe.close()


DOCS = [
    "The Amazon river flows through Brazil. It carries more water than any other river on Earth.",
    "Mount Everest is the highest mountain above sea level. It lies in the Himalayas on the border of Nepal.",
    "The Eiffel Tower was built for the 1889 World's Fair in Paris. Gustave Eiffel's company designed it.",
]


@pytest.fixture
def docs():
    return list(DOCS)


from store.redislocal import LocalRedis as RedisServer  # noqa: E402  (a real redis-server)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server, request):
    """A store URL with a prefix of its own per test, on the session's Redis."""
    return f"{redis_server.url}?prefix=t{abs(hash(request.node.nodeid)) % 10**12}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random model saved as a model directory, for other processes (Ray workers, servers) to load
    as users load theirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-model")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
