"""The RAG benchmark end to end on a tiny random model, and its metric functions exactly."""
from __future__ import annotations

import json

import pytest
import torch

from bench import metrics
from bench.report import pareto_front, update_readme
from bench.run import BenchConfig, ModeSpec, parse_mode, parse_modes, run_benchmark
from chunkcache.prompt import chunk_token_ids

QUESTIONS = [
    {"id": "q-0", "question": "Which river carries the most water?", "answers": ["The Amazon", "Amazon River"],
     "passages": [{"title": "Amazon", "text": "The Amazon river flows through Brazil. It carries more water than "
                                              "any other river on Earth."},
                  {"title": "", "text": "Mount Everest is the highest mountain above sea level, in the Himalayas."},
                  {"title": "Eiffel Tower", "text": "The Eiffel Tower was built for the 1889 World's Fair in Paris."}]},
    {"id": "q-1", "question": "Who designed the Eiffel Tower?", "answers": ["Gustave Eiffel's company"],
     "passages": [{"title": "Nile", "text": "The Nile is a major north-flowing river in northeastern Africa."},
                  {"title": "Eiffel Tower", "text": "Gustave Eiffel's company designed and built the tower in Paris."}]},
]
MODES = ("reuse", "epic", "blend-0.15", "blend-1.0", "blend-0.15-key", "blend-0.15-query", "blend-0.15-hybrid",
         "blend-0.15-impact")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_lm, hash_embedder):
    tmp = tmp_path_factory.mktemp("bench")
    data = tmp / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    readme = tmp / "README.md"
    readme.write_text("# x\n\n## Benchmarks\n<!-- bench:start -->\nOLD SECTION\n<!-- bench:end -->\n\n## After\n")
    cfg = BenchConfig(data=data, modes=MODES, max_new_tokens=6, store=tmp / "store", kv_dtype="float32",
                      out_dir=tmp / "results", readme=readme, progress=False)
    result = run_benchmark(cfg, lm=tiny_lm, embedder=hash_embedder)
    return result, tmp


def test_writes_json_markdown_png_and_readme(bench_run):
    result, tmp = bench_run
    paths = result["paths"]
    saved = json.loads(open(paths["json"]).read())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert list(saved["summary"]) == ["full", "reuse", "epic", "blend-0.15", "blend-1.00", "blend-0.15-key",
                                      "blend-0.15-query", "blend-0.15-hybrid", "blend-0.15-impact"]
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(paths["md"]).read()
    assert "| blend-0.15-hybrid |" in table and "tiny-random-0" in table
    readme = (tmp / "README.md").read_text()
    assert "OLD SECTION" not in readme and "| reuse |" in readme and readme.endswith("<!-- bench:end -->\n\n## After\n")
    assert "](results/" in readme  # the plot, linked relative to the README
    config = saved["config"]
    for key in ("model_fingerprint", "compute_dtype", "threads", "torch", "cpu", "kv_dtype", "check_layer",
                "git_commit"):
        assert key in config, key


def test_store_is_built_first_and_every_timed_call_hits(bench_run):
    result, _ = bench_run
    store = result["store"]
    assert store["chunks"] == 5 and store["chunks_computed"] == 5 and store["tokens_computed"] > 0
    assert store["bytes_per_token"] == 4 * 2 * 2 * 16 * 4  # tiny model, float32 KV
    for name, m in result["summary"].items():
        assert m["chunk_misses"] == 0, name


def test_full_is_its_own_reference(bench_run):
    full = bench_run[0]["summary"]["full"]
    assert full["kl_mean"] == 0.0 and full["kl_first"] == 0.0 and full["top1"] == 1.0
    assert full["f1_vs_full"] == 1.0 and full["recompute_fraction"] == 1.0
    assert full["speedup"] == 1.0 and full["speedup_median"] == 1.0


def test_blend_ratio_one_equals_full(bench_run, tokenizer):
    result, _ = bench_run
    for row, q in zip(result["questions"], QUESTIONS):
        # Every chunk token but the first chunk's, which sits where it was computed and is already exact.
        lens = [len(chunk_token_ids(tokenizer, f"{p['title']}\n{p['text']}")) for p in q["passages"]]
        assert row["modes"]["blend-1.00"]["stats"]["recompute_fraction"] == pytest.approx(sum(lens[1:]) / sum(lens))
    blend = result["summary"]["blend-1.00"]
    assert blend["kl_mean"] < 1e-5 and blend["top1"] == 1.0


def test_recompute_fractions_match_the_modes(bench_run):
    result, _ = bench_run
    for row in result["questions"]:
        modes = row["modes"]
        assert modes["reuse"]["stats"]["recompute_fraction"] == 0.0
        chunk_tokens = modes["reuse"]["stats"]["cached_tokens"] - result["config"]["prefix_tokens"]
        for name in ("blend-0.15", "blend-0.15-key", "blend-0.15-query", "blend-0.15-hybrid", "blend-0.15-impact"):
            assert abs(modes[name]["stats"]["recompute_fraction"] - 0.15) <= 0.5 / chunk_tokens + 1e-9, name
        assert 0 < len(row["forced_ids"]) <= 6
        for name, m in modes.items():
            assert len(m["kl"]) == len(row["forced_ids"]), name
            assert m["ttft_s"] > 0 and 0.0 <= m["f1_gold"] <= 1.0 and 0.0 <= m["top1"] <= 1.0


def test_reuse_differs_from_full(bench_run):
    """Guards the checks above from passing vacuously: on several chunks reuse is not full."""
    assert bench_run[0]["summary"]["reuse"]["kl_mean"] > 1e-4


def test_parse_mode():
    assert parse_mode("full") == ModeSpec("full", "full")
    assert parse_mode("blend-.3") == ModeSpec("blend-0.30", "blend", 0.3, "value", "deviation")
    spec = parse_mode("blend-0.15-key-hybrid-c3")
    assert spec.name == "blend-0.15-key-hybrid-c3"
    assert spec.kwargs() == {"mode": "blend", "recompute_ratio": 0.15, "deviation": "key", "selection": "hybrid",
                             "check_layer": 3}
    assert [s.name for s in parse_modes(["reuse", "full", "blend-0.1", "blend-0.10"])] == ["full", "reuse",
                                                                                            "blend-0.10"]
    assert parse_mode("blend-0.15-probe-s0.5-plain").kwargs() == {
        "mode": "blend", "recompute_ratio": 0.15, "deviation": "value", "selection": "probe", "chunk_scale": 0.5,
        "plain_entries": True}
    for bad in ("blend", "blend-1.5", "blend-0.1-sideways", "prefix", "reuse-c3", "blend-0.1-c3-key",
                "blend-0.1-s9", "full-s0.5", "reuse-plain-s0.5"):
        with pytest.raises(ValueError):
            parse_mode(bad)


def test_parse_mode_scale_and_oracles():
    spec = parse_mode("blend-0.15-impact-s0.50-qonly")
    assert spec.name == "blend-0.15-impact-s0.5-qonly"
    assert spec.kwargs() == {"mode": "blend", "recompute_ratio": 0.15, "deviation": "value", "selection": "impact",
                             "chunk_scale": 0.5, "scale_queries": "question"}
    assert parse_mode("reuse-soff").kwargs() == {"mode": "reuse", "chunk_scale": "off"}
    assert parse_mode("blend-0.1-qall").kwargs()["scale_queries"] == "all"
    assert parse_mode("reuse-scal").kwargs() == {"mode": "reuse", "chunk_scale": "calibrated"}
    oracle = parse_mode("blend-0.15-oracleout")
    assert oracle.oracle == "oracleout" and oracle.name == "blend-0.15-oracleout"
    assert "oracle" not in oracle.kwargs().values()


def test_oracle_scores_rank_by_full_prefill_statistics():
    from bench.oracles import oracle_scores

    # 3 layers, 1 kv head, 2 query heads, 4 context tokens, 2 suffix tokens; check layer 0.
    dk2 = torch.zeros(3, 1, 4)
    dv2 = torch.zeros(3, 1, 4)
    dv2[1:, 0, 2] = 4.0  # token 2 is stale after the check layer
    dk2[0, 0, 1] = 100.0  # token 1 deviates only at the check layer itself: no oracle counts it
    mass = torch.zeros(3, 2, 4)
    mass[1:, :, 3] = 1.0  # the question attends to token 3, which is not stale
    mass[1:, :, 2] = 0.5
    ref = {"dk2": dk2, "dv2": dv2, "mass": mass, "suffix_len": 2}
    dev = oracle_scores(ref, "oracle", check_layer=0)
    out = oracle_scores(ref, "oracleout", check_layer=0)
    assert dev.tolist() == [0.0, 0.0, 8.0, 0.0, 0.0, 0.0]
    assert out.tolist() == [0.0, 0.0, 4.0, 0.0, 0.0, 0.0]  # 2 layers x 2 heads x 0.5 x sqrt(4)
    with pytest.raises(ValueError):
        oracle_scores(ref, "psychic", 0)


def test_answer_f1():
    assert metrics.normalize_answer("The  Exeter College!") == "exeter college"
    assert metrics.token_f1("Exeter College, Oxford", "exeter college") == pytest.approx(0.8)
    assert metrics.token_f1("an", "the") == 1.0  # both empty after normalization
    assert metrics.token_f1("Paris", "") == 0.0
    assert metrics.best_f1("amazon", ["The Amazon", "Amazon River"]) == 1.0


def test_fidelity_exact():
    p = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    q = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    f = metrics.fidelity(p, q)
    kl0 = 0.5 * torch.log(torch.tensor(2.0)) + 0.25 * torch.log(torch.tensor(0.5))
    assert f["kl"] == pytest.approx([float(kl0), 0.0], abs=1e-7)
    assert f["kl_first"] == pytest.approx(float(kl0)) and f["kl_mean"] == pytest.approx(float(kl0) / 2)
    assert f["top1_positions"] == [0, 1] and f["top1"] == 0.5
    assert metrics.fidelity(p, p)["kl_mean"] == 0.0
    with pytest.raises(ValueError):
        metrics.fidelity(p, q[:1])


def test_pareto_front():
    speed = [1.0, 3.0, 10.0, 2.0, 10.0]
    kl = [0.0, 0.2, 0.5, 0.3, 0.6]  # point 3 is slower and worse than point 1; point 4 than point 2
    assert pareto_front(speed, kl, lower_better=True) == [0, 1, 2]
    assert pareto_front(speed, [1.0, 0.8, 0.5, 0.7, 0.4], lower_better=False) == [0, 1, 2]


def test_readme_without_markers_is_refused(tmp_path, bench_run):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        update_readme(readme, bench_run[0]["paths"]["json"])


def test_forced_ids_add_the_eos_row_when_full_stopped(tiny_lm):
    from types import SimpleNamespace

    from bench.run import forced_ids

    eos = tiny_lm.tokenizer.eos_token_id
    assert forced_ids(SimpleNamespace(token_ids=[5, 6], finish_reason="stop"), tiny_lm, 4) == [5, 6, eos]
    assert forced_ids(SimpleNamespace(token_ids=[], finish_reason="stop"), tiny_lm, 4) == [eos]
    assert forced_ids(SimpleNamespace(token_ids=[5, 6, 7, 8], finish_reason="length"), tiny_lm, 4) == [5, 6, 7, 8]


def test_bad_modes_are_refused_before_loading_anything(capsys):
    from bench.run import main

    assert main(["--modes", "reuse,blend-fast"]) == 2
    assert "unknown mode 'blend-fast'" in capsys.readouterr().err


def test_report_collects_ingest_and_http_results(bench_run):
    from pathlib import Path

    from bench.report import write_report

    result, _ = bench_run
    json_path = Path(result["paths"]["json"])
    results = json_path.parent
    ingest = {"kind": "chunkcache-bench-ingest", "created": "2026-01-01T00:00:00+00:00",
              "config": {"passages": 5, "threads": 1, "kv_dtype": "float32"}, "ingest": result["store"]}
    (results / "ingest-2026-01-01.json").write_text(json.dumps(ingest))
    timing = {"n": 3, "median": 0.5, "mean": 0.5, "p95": 0.6}
    load = {"requests": 10, "errors": 0, "requests_per_s": 1.25, "completion_tokens_per_s": 40.0,
            "latency_s": {"median": 0.8, "p95": 1.1}}
    http = {"config": {"clients": 4}, "ttft": {"direct": timing, "http": timing, "direct_pipeline": timing,
                                               "http_pipeline": timing, "http_overhead_ms_median": 2.5},
            "load": load, "baseline": None}
    (results / "http-2026-01-01.json").write_text(json.dumps(http))
    table = write_report(json_path)["md"].read_text()
    assert "Ingest (`ingest-2026-01-01.json`, 5 passages" in table
    assert "HTTP (`http-2026-01-01.json`)" in table and "| HTTP /query, 4 clients | 10 | 0 | 1.25 |" in table


def test_enriched_neighbours_are_the_nearest_other_text():
    from bench.enriched import neighbours

    class Embeds:
        def embed(self, texts):
            return [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.0]]

    # "a" twice is the same passage: never its own neighbour.
    assert neighbours(Embeds(), ["a", "b", "c", "a"]) == [1, 0, 1, 1]


def test_an_enriched_entry_is_placed_like_a_store_entry(tmp_path, tiny_lm, hash_embedder):
    """bench.enriched's entry after an empty neighbour is the plain entry; after a neighbour, placed where the chunk
    sits, its keys are those of the chunk computed right after [prefix, neighbour] there (re-rotation composes)."""
    from bench.enriched import enriched_entry
    from chunkcache.forward import forward_tokens
    from chunkcache.kvcompute import chunk_kv, prefix_cache
    from chunkcache.rope import rerotate_layers

    from .conftest import open_tiny_pipe

    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder) as pipe:
        prefix = pipe.rt.template.prefix_ids
        gen = torch.Generator().manual_seed(3)
        chunk, neighbour = (torch.randint(0, tiny_lm.config.vocab_size, (n,), generator=gen) for n in (9, 6))
        plain = chunk_kv(tiny_lm, prefix_cache(tiny_lm, prefix, len(prefix) + 9), len(prefix), chunk.tolist(),
                         pipe.rt.kv_dtype)
        torch.testing.assert_close(enriched_entry(pipe, prefix, neighbour[:0], chunk), plain, rtol=0, atol=0)
        entry = enriched_entry(pipe, prefix, neighbour, chunk)
        p, m = len(prefix), len(neighbour)
        direct = prefix_cache(tiny_lm, prefix, p + m + 9)
        forward_tokens(tiny_lm, direct, torch.cat((neighbour, chunk)), torch.arange(p, p + m + 9))
        placed = torch.empty_like(direct.k[:, :, p + m:])
        rerotate_layers(entry[0].float(), torch.full((9,), m), tiny_lm.ropes, out=placed)
        torch.testing.assert_close(placed, direct.k[:, :, p + m:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(entry[1].float(), direct.v[:, :, p + m:], rtol=0, atol=0)


def test_load_report_names_every_server_and_compares_each_with_one_at_a_time():
    from bench.load import markdown, parse_args

    def level(clients, tokens, ttft):
        return {"clients": clients, "requests": 4, "errors": [], "requests_per_s": 1.0,
                "completion_tokens_per_s": tokens, "ttft_s": {"median": ttft, "p90": ttft * 2},
                "latency_s": {"median": 2.0}}

    args = parse_args(["--clients", "1,8", "--compare-prefilling", "8"])
    rows = {"batched": [level(1, 10.0, 0.5), level(8, 30.0, 1.0)],
            "batched_prefills": [level(1, 10.0, 0.5), level(8, 27.0, 4.0)],
            "one_at_a_time": [level(1, 10.0, 0.5), level(8, 10.0, 20.0)]}
    text = markdown({"commit": "x"}, rows, args)
    assert "| 8 | batched (max_running=8, max_prefilling=8) | 1.00 | 27.0 | 4.00 s |" in text
    assert "- 8 clients: completion tok/s = 3.00x one at a time; TTFT p50 = 2.00x its single-client TTFT" in text
    assert "- 8 clients: completion tok/s = 2.70x one at a time; TTFT p50 = 8.00x its single-client TTFT" in text
    # Without the 1-client level there is no single-client TTFT: the ratio is left out, not printed as nan.
    eight = parse_args(["--clients", "8"])
    text = markdown({}, {name: [r for r in levels if r["clients"] == 8] for name, levels in rows.items()
                         if name != "batched_prefills"}, eight)
    assert "- 8 clients: completion tok/s = 3.00x one at a time\n" in text + "\n" and "nan" not in text


def test_peer_reuses_vllm_results_only_from_the_same_workload(tmp_path):
    from bench.peer import earlier_vllm, markdown

    config = {"threads": 2, "questions": 8, "clients": [1, 8], "requests_per_client": 2, "max_new_tokens": 32,
              "vllm_dtype": "float32"}
    level = {"clients": 1, "requests_per_s": 0.1, "ttft_p50_s": 10.0}
    vllm = {"ttft": [{"in_order": 20.0, "repeat": 0.5, "moved": 20.0}], "load": [level]}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"config": config, "vllm": vllm}))
    assert earlier_vllm(earlier, config) == vllm
    with pytest.raises(SystemExit, match="questions"):
        earlier_vllm(earlier, config | {"questions": 10})
    ours = {"ttft": [{"in_order": 15.0, "repeat": 5.0, "moved": 5.0}],
            "load": [level | {"requests_per_s": 0.2, "ttft_p50_s": 4.0}]}
    text = markdown({"config": config | {"vllm_from": str(earlier)}, "vllm": vllm, "chunkcache": ours})
    assert "| 1 | 0.100 | 0.200 | 2.00x | 10.00 s | 4.00 s | 0.40x |" in text and "earlier run" in text
