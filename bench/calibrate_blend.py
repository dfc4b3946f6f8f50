"""Fit blend's own attention scale on reused chunks: one S, chosen on a grid by the mean teacher-forced
KL to full prefill of the default blend (probe selection at `--ratio`) on dev questions.

    python -m bench.calibrate_blend                      # fit on dev 0-24, report on 25-49, write it
    python -m bench.calibrate_blend --grid 0.3,0.4 --no-write

`bench.calibrate` fits a per-layer table for reuse, where every chunk row after the first is stale.
Blend recomputes the rows the question reads most, and the stale rows left are another population:
on SmolLM2-135M a smaller uniform S suits them better than reuse's table. Each grid point runs the real
pipeline (`RAGPipeline.evaluate`) along full's cached greedy answer (`bench.reference`), so what is
fitted is exactly what serves. Fitting uses `--fit` questions only; `--eval` questions report the
chosen S against reuse's table and are never fitted. The value is added to the model's calibration
file (chunkcache/calibrations/<model>.json, which `bench.calibrate` writes first).

With `--chunk-context neighbour` it fits the S of context-enriched chunks instead (chunkcache/context.py),
over the store built with that recipe, against no scale (S = 1), and writes it as that recipe's
`context_log_scale`:

    python -m bench.calibrate_blend --chunk-context neighbour --grid 0.5,0.7,0.85
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import replace

import chunkcache.pipeline as pipeline
from bench import metrics
from bench.calibrate import split_args, split_of
from bench.reference import open_bench_pipeline
from bench.run import cached_full, parse_mode
from chunkcache.config import CHUNK_CONTEXTS


def mean_fidelity(pipe, questions, spec, max_new_tokens: int) -> dict:
    """Mean KL and top-1 of `spec` over `questions`, against full's cached reference."""
    kls, top1s, enriched = [], [], 0
    for q in questions:
        _, _, forced, reference = cached_full(pipe, q, max_new_tokens)
        logprobs, answer = pipe.evaluate(q.question, forced, documents=list(q.documents),
                                         max_new_tokens=max_new_tokens, free_running=False, **spec.kwargs())
        fid = metrics.fidelity(reference, logprobs)
        kls.append(fid["kl_mean"])
        top1s.append(fid["top1"])
        enriched += answer.stats.context_chunks
    return {"kl_mean": sum(kls) / len(kls), "top1": sum(top1s) / len(top1s), "questions": len(kls),
            "context_chunks_per_question": enriched / len(kls)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibrate_blend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    split_args(p)
    p.add_argument("--grid", default="0.25,0.35,0.5,0.7", help="values of S to try (default %(default)s)")
    p.add_argument("--ratio", type=float, default=0.15, help="blend's recompute ratio (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chunk-context", default="none", choices=CHUNK_CONTEXTS,
                   help="fit the S of plain chunks (none) or of chunks enriched by this recipe (default %(default)s)")
    a = p.parse_args(argv)
    fit_ids, eval_ids, questions = split_of(a)
    grid = [float(x) for x in a.grid.split(",")]
    # The whole dev set's passages, so that enriched chunks find their neighbours among all of them.
    pipe = open_bench_pipeline(a.model, a.threads, questions=questions, data=a.data, chunk_context=a.chunk_context)
    context = a.chunk_context != "none"
    # A blend scale fitted before must not stand in for reuse's table, the baseline each S is compared with.
    pipeline.load_blend_log_scale = lambda calibration_id: None
    started = time.perf_counter()
    try:
        base = parse_mode(f"blend-{a.ratio}-probe")  # chunk_scale "calibrated": reuse's table, as blend had it
        if context:
            base = replace(base, chunk_scale="off")  # enriched chunks: against no scale
        fit_questions = [questions[i] for i in fit_ids]
        scores = {"table": mean_fidelity(pipe, fit_questions, base, a.max_new_tokens)}
        for value in grid:
            scores[value] = mean_fidelity(pipe, fit_questions, replace(base, chunk_scale=value), a.max_new_tokens)
            print(f"S {value:g}: fit KL {scores[value]['kl_mean']:.4f} top-1 {scores[value]['top1']:.3f}", flush=True)
        best = min(grid, key=lambda v: scores[v]["kl_mean"])
        held = [questions[i] for i in eval_ids]
        report = {"selection": "probe", "ratio": a.ratio, "chunk_context": a.chunk_context, "fit_questions": a.fit,
                  "eval_questions": a.eval,
                  "grid": {str(k): v for k, v in scores.items()}, "chosen": best,
                  "eval": {"table": mean_fidelity(pipe, held, base, a.max_new_tokens),
                           str(best): mean_fidelity(pipe, held, replace(base, chunk_scale=best), a.max_new_tokens)},
                  "seconds": time.perf_counter() - started, "created": dt.date.today().isoformat()}
    finally:
        pipe.close()
    baseline = "no scale" if context else "reuse's table"
    table, chosen = report["grid"]["table"], report["grid"][str(best)]
    print(f"fit: {baseline} KL {table['kl_mean']:.4f} top-1 {table['top1']:.3f}; S {best:g} KL "
          f"{chosen['kl_mean']:.4f} top-1 {chosen['top1']:.3f}")
    held_table, held_best = report["eval"]["table"], report["eval"][str(best)]
    print(f"held out: {baseline} KL {held_table['kl_mean']:.4f} top-1 {held_table['top1']:.3f}; S {best:g} KL "
          f"{held_best['kl_mean']:.4f} top-1 {held_best['top1']:.3f}")
    if not a.no_write:
        from chunkcache.calibration import write_blend_scale, write_context_scale

        if table["kl_mean"] <= chosen["kl_mean"]:
            print(f"{baseline} is at least as good on the fit questions: nothing written")
        elif context:
            print(f"wrote {write_context_scale(pipe.rt.lm, a.chunk_context, best, report)}")
        else:
            print(f"wrote {write_blend_scale(pipe.rt.lm, best, report)}")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
