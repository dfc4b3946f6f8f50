"""Every supported decoder family, exactly, on tiny random-init configs (seconds each).

The layer loop drives transformers' own layers (chunkcache/layers.py); these checks hold it to
transformers' own forward with each family's quirks switched on: sliding windows narrower than the
prompt, per-layer RoPE bases, NoPE layers, partial rotary, soft-capping, multipliers, q/k norms,
fused qkv. The README's supported-architecture table is rendered from ARCHS below and checked
against the README here; `python -m tests.test_architectures` rewrites it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from .conftest import open_tiny_pipe

WINDOW = 16  # narrower than every prompt below, so sliding layers really slide
QUESTION = "Where is Mount Everest?"
FORCED = [1000, 2000, 3000, 4000, 5000]


@dataclass(frozen=True)
class Arch:
    config_class: str
    features: str  # what this row exercises, for the README table
    kwargs: dict = field(default_factory=dict)


GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
ARCHS = {
    "llama": Arch("LlamaConfig", "reference layout"),
    "llama-yarn": Arch("LlamaConfig", "YaRN RoPE (cos/sin factor)",
                       dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10_000.0,
                                             "original_max_position_embeddings": 512})),
    "mistral": Arch("MistralConfig", "no sliding window", dict(sliding_window=None)),
    "mistral-sw": Arch("MistralConfig", f"sliding window {WINDOW} on every layer", dict(sliding_window=WINDOW)),
    "qwen2": Arch("Qwen2Config", "attention biases"),
    "qwen2-sw": Arch("Qwen2Config", f"sliding window {WINDOW} from layer 1 (`max_window_layers`)",
                     dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": Arch("Qwen3Config", "q/k RMSNorm per head"),
    "gemma2": Arch("Gemma2Config", f"attention and final logit soft-capping, sliding window {WINDOW} on "
                   "alternate layers, scaled embeddings",
                   dict(sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0)),
    "gemma3_text": Arch("Gemma3TextConfig", f"local (sliding {WINDOW}) and global layers with their own RoPE "
                        "bases, q/k norms",
                        dict(sliding_window=WINDOW, query_pre_attn_scalar=16, rope_parameters=GEMMA3_ROPE,
                             layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "phi3": Arch("Phi3Config", "fused qkv, partial rotary (half the head dims)", dict(partial_rotary_factor=0.5)),
    "olmo2": Arch("Olmo2Config", "q/k norms over all heads, post-norm residuals"),
    "granite": Arch("GraniteConfig", "embedding, attention, residual and logit multipliers",
                    dict(embedding_multiplier=6.0, attention_multiplier=0.1, residual_multiplier=0.4,
                         logits_scaling=4.0)),
    "smollm3": Arch("SmolLM3Config", "NoPE layer (layer 3: its cached keys are not re-rotated)",
                    dict(no_rope_layer_interval=4)),
}
CHECKS = ("full prefill = transformers' forward (eager), prompt 3x the window",
          "incremental decode = one prefill",
          "re-rotated keys = keys computed at the target positions, every layer",
          "blend at ratio 1.0 = full",
          "one chunk right after the prefix, reused = full",
          "stored entries unchanged by a query")


def make_lm(name: str, tokenizer, seed: int = 0):
    import transformers

    from chunkcache.models import prepare_model

    arch = ARCHS[name]
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                  pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True) | arch.kwargs
    if name == "phi3":
        del kwargs["head_dim"]  # Phi-3 derives it from hidden_size / heads
    config = getattr(transformers, arch.config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the 0.02 init, so positions and context matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return prepare_model(model, tokenizer, spec=f"tiny-{name}", device=torch.device("cpu"))


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_lm(request, tokenizer):
    return make_lm(request.param, tokenizer)


@pytest.fixture
def arch_pipe(tmp_path, arch_lm, hash_embedder):
    pipe = open_tiny_pipe(tmp_path, arch_lm, hash_embedder)
    yield pipe
    pipe.close()


def transformers_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own forward with its eager attention: the definition of right."""
    from chunkcache.layers import ATTENTION_NAME

    lm.hf_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return lm.hf_model(ids[None]).logits[0].float()
    finally:
        lm.hf_model.set_attn_implementation(ATTENTION_NAME)


def test_full_prefill_equals_transformers(arch_lm):
    from chunkcache.forward import forward_tokens
    from chunkcache.kvcache import new_cache

    n = 3 * WINDOW + 5
    ids = torch.randint(0, arch_lm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    ours = forward_tokens(arch_lm, new_cache(arch_lm, n), ids, torch.arange(n), all_logits=True).logits
    torch.testing.assert_close(ours, transformers_logits(arch_lm, ids), rtol=1e-4, atol=1e-4)


def test_incremental_decode_equals_one_prefill(arch_lm):
    from chunkcache.forward import forward_tokens
    from chunkcache.kvcache import new_cache

    n = 2 * WINDOW + 8
    ids = torch.randint(0, arch_lm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(2))
    whole = forward_tokens(arch_lm, new_cache(arch_lm, n), ids, torch.arange(n), all_logits=True).logits
    cache = new_cache(arch_lm, n)
    forward_tokens(arch_lm, cache, ids[:WINDOW + 3], torch.arange(WINDOW + 3))
    for pos in range(WINDOW + 3, n):  # one token at a time, as decoding does
        step = forward_tokens(arch_lm, cache, ids[pos:pos + 1], torch.tensor([pos])).logits
        torch.testing.assert_close(step, whole[pos], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("a,b", [(0, 5), (7, 0), (3, 300), (100, 41)])
def test_rerotated_keys_equal_keys_at_target(arch_lm, a, b):
    """Every layer's own RoPE (base, partial rotary, or none) moves its cached keys exactly."""
    from chunkcache.rope import rerotate_layers

    ids = torch.randint(0, arch_lm.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    at_a = layer_keys(arch_lm, ids, a)
    moved = rerotate_layers(at_a, torch.full((20,), b - a), arch_lm.ropes, out=torch.empty_like(at_a))
    torch.testing.assert_close(moved, layer_keys(arch_lm, ids, b), rtol=1e-4, atol=1e-4)


def layer_keys(lm, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Each layer's post-RoPE keys for the same input (the embeddings) at positions start.. -> [layers, kv_heads, n, D],
    taken from transformers' attention module as it hands them to the cache."""
    from transformers import Cache

    class Stop(Exception):
        pass

    class Capture(Cache):
        def __init__(self):
            super().__init__(layers=[])

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.keys = key_states[0].clone()
            raise Stop

    hidden = lm.parts.embed(ids)
    tables = lm.parts.rotary_tables(torch.arange(start, start + len(ids)), lm.dtype)
    keys = []
    for layer, key in zip(lm.parts.layers, lm.parts.rope_keys):
        capture = Capture()
        with torch.no_grad(), pytest.raises(Stop):
            layer.self_attn(hidden, position_embeddings=tables[key], attention_mask=None,
                            cache=capture)
        keys.append(capture.keys)
    return torch.stack(keys)


def test_blend_ratio_one_equals_full(arch_pipe, docs):
    full, _ = arch_pipe.score(QUESTION, FORCED, documents=docs, mode="full")
    blend, stats = arch_pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=1.0)
    assert stats.recompute_fraction > 0.5
    torch.testing.assert_close(blend, full, rtol=1e-4, atol=1e-4)
    reuse, _ = arch_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse")
    assert (reuse - full).abs().max() > 1e-3  # cross-chunk attention matters: the check above is not vacuous


def test_single_chunk_after_prefix_reuse_equals_full(arch_pipe, docs):
    full, _ = arch_pipe.score(QUESTION, FORCED, documents=docs[:1], mode="full")
    arch_pipe.query(QUESTION, documents=docs[:1], mode="reuse", max_new_tokens=1)  # stores the chunk
    reuse, stats = arch_pipe.score(QUESTION, FORCED, documents=docs[:1], mode="reuse")
    assert stats.recompute_fraction == 0.0 and stats.cached_tokens > 0
    torch.testing.assert_close(reuse, full, rtol=1e-4, atol=1e-4)


def test_stored_entries_unchanged_by_a_query(arch_pipe, docs):
    answer = arch_pipe.query(QUESTION, documents=docs, mode="reuse", max_new_tokens=1)
    keys = [bytes.fromhex(s.key) for s in answer.sources]
    with arch_pipe.rt.store.kv.reader() as r:
        before = [r.kv(k).clone() for k in keys]
    answer = arch_pipe.query(QUESTION, documents=docs, mode="blend", recompute_ratio=0.5, max_new_tokens=3)
    assert answer.stats.chunk_hits == len(docs)
    with arch_pipe.rt.store.kv.reader() as r:
        for k, old in zip(keys, before):
            assert torch.equal(r.kv(k), old)


# -- refusals ------------------------------------------------------------------------------------

def _refusal(config) -> str:
    from transformers import AutoModelForCausalLM

    from chunkcache.models import ModelLoadError, prepare_model

    with pytest.raises(ModelLoadError) as info:
        prepare_model(AutoModelForCausalLM.from_config(config), None, spec="x", device=torch.device("cpu"))
    return str(info.value)


def test_unknown_family_is_refused_with_the_supported_list():
    from transformers import GPT2Config

    message = _refusal(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "'gpt2' is not supported" in message and "gemma3_text" in message


@pytest.mark.parametrize("rope,why", [
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10_000.0}, "dynamic NTK"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 256, "rope_theta": 10_000.0}, None),
])
def test_rope_variants_that_do_not_compose_are_refused(rope, why):
    from transformers import LlamaConfig

    from chunkcache.models import check_architecture

    config = LlamaConfig(rope_parameters=rope)
    if why is None:
        check_architecture(config)  # llama3 composes: accepted
        return
    from chunkcache.models import ModelLoadError

    with pytest.raises(ModelLoadError, match=why):
        check_architecture(config)


# -- the README table ----------------------------------------------------------------------------

TABLE_START = "<!-- architectures: generated by tests/test_architectures.py -->"
TABLE_END = "<!-- /architectures -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def render_table() -> str:
    lines = [TABLE_START, "", "| model type | tiny config exercises |", "|---|---|"]
    lines += [f"| `{ARCHS[name].config_class[:-len('Config')]}` ({name}) | {ARCHS[name].features} |" for name in ARCHS]
    lines += ["", "Each row passes, on a 4-layer random-init model: " + "; ".join(CHECKS) + ".", "", TABLE_END]
    return "\n".join(lines)


def test_readme_table_is_current():
    text = README.read_text()
    assert render_table() in text, "README's architecture table is stale: run `python -m tests.test_architectures`"


if __name__ == "__main__":
    text = README.read_text()
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    README.write_text(pattern.sub(lambda _: render_table(), text))
    print(f"wrote the architecture table into {README}")


def test_a_flattened_batch_equals_each_request_alone(arch_lm):
    """The continuous-batching shape: a prompt prefill, a decode step and a mid-prompt continuation
    (with a chunk-scale bias) in one pass give each request's own logits and cache rows."""
    from chunkcache.forward import forward_batch, forward_tokens
    from chunkcache.kvcache import new_cache

    gen = torch.Generator().manual_seed(4)
    ids = [torch.randint(0, arch_lm.config.vocab_size, (n,), generator=gen) for n in (40, 30, 50)]

    def prepared():
        caches = [new_cache(arch_lm, 64) for _ in ids]
        forward_tokens(arch_lm, caches[1], ids[1][:29], torch.arange(29))  # decodes token 29 next
        forward_tokens(arch_lm, caches[2], ids[2][:20], torch.arange(20))  # continues from 20
        caches[2].key_bias = torch.zeros(arch_lm.num_layers, 1, 64)
        caches[2].key_bias[:, :, 5:15] = -0.7
        caches[2].bias_from = 20
        return caches, [(ids[0], torch.arange(40)), (ids[1][29:], torch.tensor([29])), (ids[2][20:], torch.arange(20, 50))]

    alone_caches, work = prepared()
    alone = torch.stack([forward_tokens(arch_lm, c, t, p).logits for c, (t, p) in zip(alone_caches, work)])
    batch_caches, work = prepared()
    batched, _ = forward_batch(arch_lm, [(c, t, p) for c, (t, p) in zip(batch_caches, work)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    for a, b in zip(alone_caches, batch_caches):
        torch.testing.assert_close(b.k[:, :, :b.length], a.k[:, :, :a.length], rtol=1e-5, atol=1e-5)
        assert a.length == b.length


def test_pooled_decode_steps_equal_each_request_alone(arch_lm):
    """Decode steps whose caches are slots of one KVPool attend in one call per layer (forward.DecodeGroup): with
    different lengths, a chunk-scale bias on one, a prefill piece in the same pass and a slot left out of the
    step, each request gets its own logits and rows (sliding windows and soft caps included)."""
    from chunkcache.forward import RowPass, Segment, forward_batch, forward_tokens
    from chunkcache.kvcache import KVPool, new_cache

    gen = torch.Generator().manual_seed(7)
    lengths = (37, 22, 45, 30, 12)
    ids = [torch.randint(0, arch_lm.config.vocab_size, (n + 1,), generator=gen) for n in lengths]

    def prepared(pool):
        caches = []
        for n, x in zip(lengths, ids):
            cache = pool.take(64, n) if pool is not None else new_cache(arch_lm, 64)
            forward_tokens(arch_lm, cache, x[:n], torch.arange(n))
            caches.append(cache)
        # The last request is prefilling one row at a time: its row 11 is computed now, row 12 on is
        # unwritten prompt (NaN, as a reused buffer may hold). It must not join the decode steps' call.
        caches[4].k[:, :, 11:13] = caches[4].v[:, :, 11:13] = float("nan")
        caches[4].prompt_rows = 13
        bias = torch.zeros(arch_lm.num_layers, 1, 64)
        bias[:, :, 5:15] = -0.7
        bias[:, :, 45] = -0.7  # the row request 2 decodes into: computing it clears its bias
        caches[2].set_key_bias(bias, 20)
        work = [(c, x[n:], torch.tensor([n])) for c, n, x in zip(caches, lengths, ids)]
        work[3] = (caches[3], ids[3][10:30], torch.arange(10, 30))  # a prefill piece, recomputing rows 10..29
        work[4] = (caches[4], ids[4][11:12], torch.tensor([11]))  # a one-row prefill piece
        return caches, work[:1] + work[2:]  # slot 1 sits this step out

    alone_caches, work = prepared(None)
    alone = torch.stack([forward_tokens(arch_lm, c, t, p).logits for c, t, p in work])
    pool = KVPool(arch_lm, 5, 64)
    pool.k.fill_(float("nan"))  # what a reused buffer may hold: take() must leave no NaN where a decode reads
    pool.v.fill_(float("nan"))
    pooled_caches, work = prepared(pool)
    rows = RowPass([Segment(c, p, arch_lm.device) for c, _, p in work], probe_layer=None)
    assert len(rows.group.members) == 2  # the pooled path is the one under test (the prefill pieces are alone)
    pooled, _ = forward_batch(arch_lm, work)
    torch.testing.assert_close(pooled, alone, rtol=1e-4, atol=1e-4)
    for a, b in zip(alone_caches, pooled_caches):
        assert a.length == b.length
        torch.testing.assert_close(b.k[:, :, :b.length], a.k[:, :, :a.length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.v[:, :, :b.length], a.v[:, :, :a.length], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled_caches[2].key_bias[:, :, 5:15].expand(-1, arch_lm.num_q_heads, -1),
                               torch.full((arch_lm.num_layers, arch_lm.num_q_heads, 10), -0.7))
    assert not pooled_caches[2].key_bias[:, :, 45].any()
