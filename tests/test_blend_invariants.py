"""The blend path's mathematical invariants (DESIGN.md section 5), on a tiny random-init model."""
from __future__ import annotations

import pytest
import torch

from blend_kernels import rerotate_keys
from chunkcache.blend import PromptLayout, initial_positions
from chunkcache.forward import forward_tokens
from chunkcache.kvcache import new_cache
from chunkcache.prompt import chunk_token_ids

from .conftest import needs_bf16_linears

QUESTION = "Where is Mount Everest?"
FORCED = [1000, 2000, 3000, 4000, 5000]


def test_full_prefill_matches_transformers_forward(tiny_lm):
    ids = torch.randint(0, tiny_lm.config.vocab_size, (37,), generator=torch.Generator().manual_seed(1))
    cache = new_cache(tiny_lm, 40)
    ours = forward_tokens(tiny_lm, cache, ids, torch.arange(37), all_logits=True).logits
    with torch.no_grad():
        ref = tiny_lm.hf_model(ids[None]).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_incremental_decode_matches_one_prefill(tiny_lm):
    ids = torch.randint(0, tiny_lm.config.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    whole = forward_tokens(tiny_lm, new_cache(tiny_lm, 20), ids, torch.arange(20), all_logits=True).logits
    cache = new_cache(tiny_lm, 20)
    forward_tokens(tiny_lm, cache, ids[:12], torch.arange(12))
    tail = forward_tokens(tiny_lm, cache, ids[12:], torch.arange(12, 20), all_logits=True).logits
    torch.testing.assert_close(tail, whole[12:], rtol=1e-4, atol=1e-4)


def test_blend_ratio_one_equals_full(tiny_pipe, docs):
    full, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="full")
    blend, stats = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=1.0)
    # Every chunk token but the first chunk's (already exact: it sits where it was computed).
    assert stats.recompute_fraction == pytest.approx(_later_chunks_share(tiny_pipe, docs))
    torch.testing.assert_close(blend, full, rtol=1e-4, atol=1e-4)


@needs_bf16_linears
def test_blend_ratio_one_equals_full_with_bfloat16_linear_weights(tmp_path, tokenizer, hash_embedder, docs):
    from .conftest import make_tiny_lm, open_tiny_pipe

    with open_tiny_pipe(tmp_path, make_tiny_lm(tokenizer, linear_dtype="bfloat16"), hash_embedder) as pipe:
        full, _ = pipe.score(QUESTION, FORCED, documents=docs, mode="full")
        blend, _ = pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=1.0)
    torch.testing.assert_close(blend, full, rtol=1e-4, atol=1e-4)


def test_single_chunk_after_prefix_reuse_equals_full(tiny_pipe, docs):
    full, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs[:1], mode="full")
    tiny_pipe.query(QUESTION, documents=docs[:1], mode="reuse", max_new_tokens=1)  # stored: read back below
    reuse, stats = tiny_pipe.score(QUESTION, FORCED, documents=docs[:1], mode="reuse")
    assert stats.recompute_fraction == 0.0 and stats.cached_tokens > 0
    torch.testing.assert_close(reuse, full, rtol=1e-4, atol=1e-4)


def test_reuse_of_several_chunks_differs_from_full(tiny_pipe, docs):
    """Guards the tests above from passing vacuously: cross-chunk attention must matter."""
    full, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="full")
    reuse, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse")
    assert (full - reuse).abs().max() > 1e-3


@pytest.mark.parametrize("a,b", [(0, 5), (7, 0), (3, 300), (100, 41)])
def test_rerotated_keys_equal_keys_computed_at_target(tiny_lm, a, b):
    """A whole sequence shifted by b-a has the same hidden states (RoPE is relative), so every layer's
    keys computed at b must equal the keys computed at a re-rotated by b-a."""
    ids = torch.randint(0, tiny_lm.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    model = tiny_lm.hf_model

    def keys_at(start):
        with torch.no_grad():
            out = model(ids, position_ids=torch.arange(start, start + 24)[None], use_cache=True)
        return torch.stack([layer.keys[0] for layer in out.past_key_values.layers])  # [L, H, T, D]

    moved = rerotate_keys(keys_at(a), torch.full((24,), b - a), tiny_lm.ropes[0].inv_freq)
    torch.testing.assert_close(moved, keys_at(b), rtol=1e-4, atol=1e-4)


def test_rerotation_composes(tiny_lm):
    keys = torch.randn(3, 2, 11, tiny_lm.head_dim)
    d1, d2 = torch.full((11,), 17), torch.full((11,), -5)
    twice = rerotate_keys(rerotate_keys(keys, d1, tiny_lm.ropes[0].inv_freq), d2, tiny_lm.ropes[0].inv_freq)
    once = rerotate_keys(keys, d1 + d2, tiny_lm.ropes[0].inv_freq)
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-5)


def _later_chunks_share(pipe, docs):
    lens = [len(chunk_token_ids(pipe.rt.lm.tokenizer, d)) for d in docs]
    return sum(lens[1:]) / sum(lens)


def _final_cache_rows(pipe, question, docs):
    """The request cache after a blend prefill (chunk rows at every layer)."""
    req = pipe._request(question, None, docs, "blend", 0.3, 4, 0.0, 1.0, 0, None, None, selection="deviation")
    prep = pipe._prepare(req)
    return prep.cache, prep.layout


def test_selected_queries_never_see_later_keys(tiny_pipe, docs):
    """Chunk tokens come before the question, so their recomputed KV must not depend on it.

    Deviation selection at the check layer does not look at the question either, so two questions
    give the same selection; with a bottom-right-aligned mask (the reference implementations' bug)
    early selected tokens would see the question's keys and these rows would differ.
    """
    cache_a, layout = _final_cache_rows(tiny_pipe, "Where is Mount Everest?", docs)
    cache_b, _ = _final_cache_rows(tiny_pipe, "Who designed the Eiffel Tower for the fair in Paris, France?", docs)
    end = layout.suffix_start
    # Float tolerance only: which other queries share an attention block changes the summation
    # order; a leak of the question's keys would move these rows by O(1).
    torch.testing.assert_close(cache_a.k[:, :, :end], cache_b.k[:, :, :end], rtol=0, atol=1e-5)
    torch.testing.assert_close(cache_a.v[:, :, :end], cache_b.v[:, :, :end], rtol=0, atol=1e-5)
    assert not torch.allclose(cache_a.k[:, :, end:end + 3], cache_b.k[:, :, end:end + 3], atol=1e-2)


def test_suffix_always_recomputed(tiny_pipe, docs):
    tiny_pipe.query(QUESTION, documents=docs, mode="reuse", max_new_tokens=1)  # stored: cached_tokens counts hits
    answer = tiny_pipe.query(QUESTION, documents=docs, mode="blend", recompute_ratio=0.0, max_new_tokens=1)
    suffix_len = answer.stats.prompt_tokens - answer.stats.cached_tokens
    assert answer.stats.recompute_fraction == 0.0
    assert answer.stats.recomputed_tokens == suffix_len > 1


# Stored entries unchanged by a blend query: tests/test_architectures.py, for every supported family.


def test_blend_ratio_trades_recompute_for_fidelity(tiny_pipe, docs):
    full, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="full")
    errors = []
    for ratio in (0.0, 0.5, 1.0):
        blend, stats = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=ratio)
        assert abs(stats.recompute_fraction - min(ratio, _later_chunks_share(tiny_pipe, docs))) < 0.05
        errors.append((blend - full).abs().max().item())
    assert errors[0] >= errors[1] >= errors[2]
    assert errors[2] < 1e-4


def test_epic_recomputes_heads_of_later_chunks():
    layout = PromptLayout(prefix_len=5, chunk_lens=(10, 4, 10), suffix_len=3)
    positions = initial_positions("epic", layout, epic_tokens=6).tolist()
    assert positions == [15, 16, 17, 18] + [19, 20, 21, 22, 23, 24] + [29, 30, 31]


# -- the attention scale on reused chunks (blend.chunk_key_bias) ------------------------------------

@pytest.mark.parametrize("mode,ratio", [("reuse", None), ("blend", 0.3)])
def test_chunk_scale_one_is_plain(tiny_pipe, docs, mode, ratio):
    kwargs = {"recompute_ratio": ratio} if ratio is not None else {}
    plain, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode=mode, chunk_scale="off", **kwargs)
    one, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode=mode, chunk_scale=1.0, **kwargs)
    # S = 1 builds no bias at all; a zero bias through the masked paths must give the same numbers.
    zero, _ = _score_with_log_scale(tiny_pipe, docs, mode, ratio, torch.zeros(tiny_pipe.rt.lm.num_layers, 1))
    torch.testing.assert_close(one, plain, rtol=0, atol=0)
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)
    scaled, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode=mode, chunk_scale=0.5, **kwargs)
    assert (scaled - plain).abs().max() > 1e-3


def test_chunk_scale_keeps_blend_ratio_one_equal_to_full(tiny_pipe, docs):
    """Recomputed rows are fresh, so the scale leaves them alone: ratio 1.0 is still full."""
    full, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="full")
    blend, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=1.0, chunk_scale=0.3)
    torch.testing.assert_close(blend, full, rtol=1e-4, atol=1e-4)


def test_chunk_scale_leaves_a_single_exact_chunk_alone(tiny_pipe, docs):
    """The first chunk is exact where it sits: reuse of it alone still equals full, whatever S."""
    full, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs[:1], mode="full")
    reuse, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs[:1], mode="reuse", chunk_scale=0.3)
    torch.testing.assert_close(reuse, full, rtol=1e-4, atol=1e-4)


def test_chunk_scale_question_only_keeps_chunk_rows(tiny_pipe, docs):
    """scale_queries="question": recomputed chunk tokens attend plainly, so their KV equals plain blend's.

    Check layer 1: on this tiny model, selection at layer 0 picks only tokens that come before every
    stale row, so no recomputed token would see a scaled key either way."""
    def rows(**kw):
        # A fixed selection: the probe's choice itself depends on the scale (its reuse pass takes it).
        req = tiny_pipe._request(QUESTION, None, docs, "blend", 0.3, 4, 0.0, 1.0, 0, None, None, check_layer=1,
                                 selection="impact", **kw)
        prep = tiny_pipe._prepare(req)
        return prep.cache.k[:, :, :prep.layout.suffix_start].clone(), prep.logits
    plain_k, plain_logits = rows(chunk_scale="off")
    question_k, question_logits = rows(chunk_scale=0.4, scale_queries="question")
    all_k, _ = rows(chunk_scale=0.4, scale_queries="all")
    torch.testing.assert_close(question_k, plain_k, rtol=0, atol=1e-5)
    assert (all_k - plain_k).abs().max() > 1e-3
    assert (question_logits - plain_logits).abs().max() > 1e-3


def test_chunk_key_bias_marks_only_later_chunks():
    from chunkcache.blend import chunk_key_bias

    layout = PromptLayout(3, (4, 5, 2), 3)
    bias = chunk_key_bias(layout, torch.tensor([[-1.0], [-2.0]]), capacity=20)
    assert bias.shape == (2, 1, 20)
    expected = torch.zeros(20)
    expected[7:14] = 1.0
    torch.testing.assert_close(bias[:, 0], torch.outer(torch.tensor([-1.0, -2.0]), expected))


def test_bad_chunk_scale_is_refused(tiny_pipe, docs):
    from chunkcache.pipeline import QueryError

    for bad in (0.0, -1.0, 10.0, "sometimes"):
        with pytest.raises(QueryError, match="chunk_scale"):
            tiny_pipe.query(QUESTION, documents=docs, chunk_scale=bad, max_new_tokens=1)


def _score_with_log_scale(pipe, docs, mode, ratio, log_scale):
    """Teacher-forced scores through a given log(S) table (what a calibration file provides)."""
    original = pipe._chunk_log_scale
    pipe._chunk_log_scale = lambda _scale, _mode: log_scale
    try:
        kwargs = {"recompute_ratio": ratio} if ratio is not None else {}
        return pipe.score(QUESTION, FORCED, documents=docs, mode=mode, chunk_scale=0.5, **kwargs)
    finally:
        pipe._chunk_log_scale = original


# -- the "probe" selection: question attention from a reuse pass, over every layer -----------------------------

def test_attention_mass_is_what_the_queries_paid(tiny_lm):
    """Each query's attention sums to 1 per layer and head; none of it goes to a later key."""
    ids = torch.randint(0, tiny_lm.config.vocab_size, (36,), generator=torch.Generator().manual_seed(8))
    cache = new_cache(tiny_lm, 40)
    forward_tokens(tiny_lm, cache, ids[:30], torch.arange(30))
    result = forward_tokens(tiny_lm, cache, ids[30:34], torch.arange(30, 34), attention_mass=True)
    mass = result.info["attention_mass"]
    assert mass.shape == (34,)
    torch.testing.assert_close(mass.sum(), torch.tensor(float(tiny_lm.num_layers * tiny_lm.num_q_heads * 4)))
    assert (mass[:30] > 0).all() and mass[33] < mass[:33].max()  # only the last query sees the last key


def test_probe_selection_ratio_one_equals_full_and_keeps_its_budget(tiny_pipe, docs):
    full, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="full")
    one, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=1.0, selection="probe")
    torch.testing.assert_close(one, full, rtol=1e-4, atol=1e-4)
    part, stats = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=0.3,
                                  selection="probe")
    assert abs(stats.recompute_fraction - 0.3) < 0.05
    impact, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=0.3,
                                selection="impact")
    assert not torch.equal(part, impact)  # a different set of tokens: the prior is not the check layer's


def test_probe_selection_is_decided_before_layer_zero():
    from chunkcache.blend import blend_selector, prior_positions

    layout = PromptLayout(prefix_len=3, chunk_lens=(4, 5), suffix_len=2)  # chunk 2 at 7..11, suffix 12..13
    prior = torch.zeros(14)
    prior[[9, 4, 13]] = torch.tensor([5.0, 9.0, 1.0])  # 4 sits in the exact first chunk: not a candidate
    assert prior_positions(layout, 0.12, prior).tolist() == [9, 12, 13]  # 1 of 9 chunk tokens, then the suffix
    with pytest.raises(ValueError, match="before layer 0"):
        blend_selector(layout, 0.2, selection="probe")


def test_impact_at_layer_zero_is_not_degenerate_with_float32_stores(tiny_pipe, docs):
    """Layer 0's fresh KV equals the cached one exactly in a float32 store: impact weighs value norms there,
    so it does not fall back to the first tokens in prompt order."""
    seen = []
    import chunkcache.blend as blend

    original = blend.select_tokens

    def spy(scores, budget, always):
        picked = original(scores, budget, always)
        seen.append(picked)
        return picked

    blend.select_tokens = spy
    try:
        tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="blend", recompute_ratio=0.3, selection="impact",
                        check_layer=0)
    finally:
        blend.select_tokens = original
    chosen = seen[0][:-1]
    assert not torch.equal(chosen[:10], torch.arange(10))


def test_the_forward_pass_keeps_versioned_positions(tiny_lm):
    """chunkcache's rows carry normal (not inference) position tensors, so their range check is
    remembered across layers: an inference tensor would cost a check per layer (a sync on CUDA)."""
    from chunkcache.forward import Segment
    from chunkcache.kvcache import new_cache

    with torch.inference_mode():
        segment = Segment(new_cache(tiny_lm, 16), torch.arange(4, 9), tiny_lm.device)
    assert not segment.positions.is_inference() and segment.kv_len == 9 and not segment.contiguous_from_zero
