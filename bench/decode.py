"""Decode benchmark: single-stream tokens/s with float32 and bfloat16 linear weights, side by side,
against this machine's weight-read limit, and what bfloat16 weights cost in fidelity.

    python -m bench.decode --threads 2                 # ~10 min on 2 quiet cores
    python -m bench.decode --speed-questions 2 --fidelity-questions 0

Speed: each of --speed-questions MuSiQue dev questions with its first passage (~650-token prompts),
reuse mode, --max-new-tokens greedy tokens through `pipe.query` (the engine, as a served request),
the two weight dtypes alternating per question. A step reads every linear's weights once, so its floor
is their bytes over the memory bandwidth measured here (a large read, best of several).

Fidelity: on --fidelity-questions held-out questions (25 on) with all ten passages (~6.2k tokens),
KL to the float32 model's full prefill, teacher-forced along its greedy answer, of full and blend 0.15
with bfloat16 weights, and of blend 0.15 with float32 weights for scale.
Results: bench/results/decode/<date>-t<threads>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

from bench import metrics
from bench.data import DEFAULT_DATA, REPO_ROOT, load_questions
from bench.envinfo import dump_json, environment, next_free_path
from bench.http import stop_engines_but
from bench.kernels import time_cpu
from chunkcache.config import LINEAR_DTYPES

RESULTS_DIR = Path(__file__).parent / "results" / "decode"
STORE_ROOT = REPO_ROOT / ".cache" / "bench-decode"
FIDELITY_FIRST = 25  # the held-out half of dev (the calibrations are fitted on 0-24)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--speed-questions", type=int, default=6, choices=range(1, 51), metavar="1..50")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--fidelity-questions", type=int, default=10)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of reading a `gib` GiB fp32 tensor once (a sum), best of `repeats`."""
    x = torch.ones(int(gib * 2**30) // 4)
    best_ms = time_cpu({"sum": x.sum}, warmup=1, repeats=repeats)["sum"]  # the warm-up faults the pages in
    return x.numel() * 4 / (best_ms / 1e3)


def weight_bytes_per_token(lm) -> int:
    """What one decode step must read: every linear's packed weight (the LM head included), once."""
    from chunkcache.cpu_linear import PackedLinear

    return sum(m.packed.numel() * m.packed.element_size() if isinstance(m, PackedLinear)
               else m.weight.numel() * m.weight.element_size()
               for m in lm.hf_model.modules() if isinstance(m, (PackedLinear, torch.nn.Linear)))


def open_pipe(linear_dtype: str, threads: int | None):
    from chunkcache import RAGPipeline

    overrides = {"threads": threads} if threads else {}
    return RAGPipeline.open(STORE_ROOT / linear_dtype, linear_dtype=linear_dtype, **overrides)


def speed(pipes: dict, questions, max_new_tokens: int) -> dict:
    """Per dtype: ms per decode token of each question (alternating dtypes, after one warm-up query)."""
    runs: dict[str, list[dict]] = {name: [] for name in pipes}
    for name, pipe in pipes.items():
        pipe.query(questions[0].question, documents=list(questions[0].documents[:1]), mode="reuse", max_new_tokens=4)
    for number, q in enumerate(questions):
        order = list(pipes) if number % 2 == 0 else list(reversed(pipes))
        for name in order:
            stop_engines_but(pipes, name)  # one engine thread at a time
            answer = pipes[name].query(q.question, documents=list(q.documents[:1]), mode="reuse",
                                       max_new_tokens=max_new_tokens)
            steps = max(1, answer.stats.completion_tokens)
            runs[name].append({"id": q.id, "prompt_tokens": answer.stats.prompt_tokens, "tokens": steps,
                               "ms_per_token": 1000 * answer.timings.decode_s / steps, "ttft_s": answer.ttft_s,
                               "text": answer.text})
    return runs


def fidelity(pipes: dict, questions, max_new_tokens: int) -> list[dict]:
    """KL to float32 full prefill of: bfloat16 full, bfloat16 blend 0.15, float32 blend 0.15."""
    rows = []
    for q in questions:
        docs = list(q.documents)
        reference, answer = pipes["float32"].evaluate(q.question, None, documents=docs, mode="full",
                                                      max_new_tokens=max_new_tokens)
        forced = answer.token_ids[:len(reference)] or [pipes["float32"].rt.lm.tokenizer.eos_token_id]
        reference = reference[:len(forced)]
        row = {"id": q.id, "prompt_tokens": answer.stats.prompt_tokens}
        for label, name, kwargs in (("bf16_full", "bfloat16", dict(mode="full")),
                                    ("bf16_blend", "bfloat16", dict(mode="blend", recompute_ratio=0.15)),
                                    ("fp32_blend", "float32", dict(mode="blend", recompute_ratio=0.15))):
            logprobs, _ = pipes[name].evaluate(q.question, forced, documents=docs, free_running=False, **kwargs)
            fid = metrics.fidelity(reference, logprobs)
            row[label] = {"kl_mean": fid["kl_mean"], "top1": fid["top1"]}
        rows.append(row)
        print(f"  {q.id}: " + ", ".join(f"{k} KL {row[k]['kl_mean']:.4f} top-1 {row[k]['top1']:.3f}"
                                        for k in ("bf16_full", "bf16_blend", "fp32_blend")), flush=True)
    return rows


def summarize(runs: dict, bandwidth: float, weight_bytes: dict, fid: list[dict]) -> dict:
    out = {}
    for name, rows in runs.items():
        ms = metrics.median([r["ms_per_token"] for r in rows])
        limit = bandwidth / weight_bytes[name]
        out[name] = {"ms_per_token": ms, "tokens_per_s": 1000 / ms, "weight_bytes_per_token": weight_bytes[name],
                     "weight_read_limit_tokens_per_s": limit, "share_of_limit": 1000 / ms / limit,
                     "prompt_tokens_mean": metrics.mean([r["prompt_tokens"] for r in rows])}
    for label in ("bf16_full", "bf16_blend", "fp32_blend"):
        if fid:
            out[label] = {"kl_mean": metrics.mean([r[label]["kl_mean"] for r in fid]),
                          "top1": metrics.mean([r[label]["top1"] for r in fid]), "questions": len(fid)}
    return out


def markdown(result: dict) -> str:
    s, c = result["summary"], result["config"]
    title = "float32 against bfloat16 linear weights" if "bfloat16" in s else "float32 linear weights"
    lines = [f"### Single-stream decode: {title} ({result['created'][:10]})", "",
             f"SmolLM2-135M-Instruct, {c['threads']} threads, {c['cpu']}; reuse mode, ~{s['float32']['prompt_tokens_mean']:.0f}"
             f"-token prompts, {c['max_new_tokens']} new tokens, {c['speed_questions']} questions"
             f"{' alternating' if 'bfloat16' in s else ''}; read "
             f"bandwidth {result['bandwidth_gb_s']:.1f} GB/s.", "",
             "| linear weights | ms/token (median) | tokens/s | weights read per token | weight-read limit | share of limit |",
             "|---|--:|--:|--:|--:|--:|"]
    for name in [n for n in LINEAR_DTYPES if n in s]:
        r = s[name]
        lines.append(f"| {name} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['weight_bytes_per_token'] / 1e6:.0f} MB | {r['weight_read_limit_tokens_per_s']:.1f} tok/s | "
                     f"{r['share_of_limit']:.0%} |")
    if "bfloat16" not in s:
        lines += ["", "bfloat16 weights were not measured: this CPU has no oneDNN bf16 products (AVX-512 or AMX)."]
    if "bf16_full" in s:
        lines += ["", f"Fidelity on dev questions {FIDELITY_FIRST}-{FIDELITY_FIRST + s['bf16_full']['questions'] - 1} "
                  "(~6.2k tokens), KL to the float32 model's full prefill, teacher-forced along its greedy answer:", "",
                  "| | mean KL | top-1 agreement |", "|---|--:|--:|"]
        for label, text in (("bf16_full", "full, bfloat16 weights"), ("bf16_blend", "blend 0.15, bfloat16 weights"),
                            ("fp32_blend", "blend 0.15, float32 weights")):
            lines.append(f"| {text} | {s[label]['kl_mean']:.4f} | {s[label]['top1']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from chunkcache.cpu_linear import onednn_bf16_available
    from chunkcache.openmp import in_passing_thread

    dtypes = [name for name in LINEAR_DTYPES if name == "float32" or onednn_bf16_available()]
    if args.fidelity_questions and "bfloat16" not in dtypes:
        print("this CPU has no oneDNN bf16 products: float32 speed only, no bf16 fidelity", file=sys.stderr)
        args.fidelity_questions = 0
    pipes = {name: open_pipe(name, args.threads) for name in dtypes}
    try:
        # Off the main thread: a parallel region here would leave it an OpenMP team beside the engine's, which
        # slows the engine's decode (chunkcache/openmp.py).
        bandwidth = in_passing_thread(read_bandwidth)
        weight_bytes = {name: weight_bytes_per_token(p.rt.lm) for name, p in pipes.items()}
        speed_qs = load_questions(args.data, args.speed_questions)
        runs = speed(pipes, speed_qs, args.max_new_tokens)
        fid_qs = load_questions(args.data, FIDELITY_FIRST + args.fidelity_questions)[FIDELITY_FIRST:] \
            if args.fidelity_questions else []
        fid = fidelity(pipes, fid_qs, 32)
        env = environment(pipes["float32"])
    finally:
        for p in pipes.values():
            p.close()
    result = {"kind": "chunkcache-bench-decode", "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "config": {**env, "max_new_tokens": args.max_new_tokens, "speed_questions": len(speed_qs),
                         "fidelity_questions": len(fid_qs)},
              "bandwidth_gb_s": bandwidth / 1e9, "summary": summarize(runs, bandwidth, weight_bytes, fid),
              "speed": runs, "fidelity": fid}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = next_free_path(args.out_dir / f"{dt.date.today().isoformat()}-t{env['threads']}.json")
    path.write_text(dump_json(result))
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
