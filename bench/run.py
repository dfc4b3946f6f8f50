"""RAG benchmark: TTFT and fidelity to full prefill of every mode, on MuSiQue dev questions.

    python -m bench.run                              # all 50 questions, every mode (1-1.5 h on 2 quiet cores)
    python -m bench.run --limit 2 --modes reuse,blend-0.15 --out-dir /tmp/bench
    python -m bench.run --readme                     # also rewrite README.md's benchmark section

Each question's passages are its `documents` (one chunk each, f"{title}\\n{text}"); their KVs are
stored first (timed apart). Then, per question, modes run interleaved (full first, the others in an
order rotated per question) so that drift hits all modes alike:
  1. `full`, free-running greedy: its answer (first --max-new-tokens tokens) and its TTFT;
  2. `full` teacher-forced along that answer: the reference next-token distributions (the
     free-running greedy steps' own distributions, which `evaluate` returns: no second prefill);
  3. every other mode, one prefill each: teacher-forced along full's answer (KL(full || mode),
     top-1 agreement, first-token KL) and free-running (its own answer, its TTFT).
TTFT is retrieve + load + prefill from the Answer's timings: the same figure in every mode,
request start to first-token logits.

Mode names: full, reuse, epic, blend-R (recompute ratio R), with optional suffixes -key/-value
(deviation; default value), -query/-hybrid/-impact/-deviation (selection; default deviation) and
-cN (check layer N; default --check-layer): e.g. blend-0.15-key-c3.
Results: bench/results/<date>-<config>.json (every per-question figure and the configuration),
.md beside it (the table) and .png (fidelity vs TTFT speed-up, Pareto front).
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from bench import metrics
from bench.data import DEFAULT_DATA, REPO_ROOT, Question, load_questions, passage_documents
from bench.envinfo import dump_json, environment, next_free_path
from bench.ingest import build_store

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_STORE_ROOT = REPO_ROOT / ".cache" / "bench-store"
# The ratio sweep runs chunkcache's default selection (impact); CacheBlend's deviation-only
# selection (V and K) and the other schemes run at the default ratio beside it.
DEFAULT_MODES = ("full", "reuse", "epic", "blend-0.05-impact", "blend-0.10-impact", "blend-0.15-impact",
                 "blend-0.30-impact", "blend-0.15-key-impact", "blend-0.15", "blend-0.15-key", "blend-0.15-query")
RESULT_KIND = "chunkcache-bench-rag"


@dataclass(frozen=True)
class ModeSpec:
    """One benchmarked configuration: a pipeline mode and its blend settings."""

    name: str
    mode: str
    recompute_ratio: float | None = None
    deviation: str | None = None
    selection: str | None = None
    check_layer: int | None = None  # None: the pipeline's (--check-layer)

    def kwargs(self) -> dict:
        """The `RAGPipeline.evaluate` keyword arguments of this mode."""
        out = {"mode": self.mode}
        for name in ("recompute_ratio", "deviation", "selection", "check_layer"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def parse_mode(name: str) -> ModeSpec:
    """`full`, `reuse`, `epic` or `blend-R[-<deviation>][-<selection>][-cN]` (R the recompute ratio)."""
    from chunkcache.config import DEVIATIONS, SELECTIONS

    if name in ("full", "reuse", "epic"):
        return ModeSpec(name, name)
    m = re.fullmatch(rf"blend-(\d*\.?\d+)(-(?:{'|'.join(DEVIATIONS)}))?(-(?:{'|'.join(SELECTIONS)}))?(-c\d+)?", name)
    if not m:
        raise ValueError(f"unknown mode {name!r}; use full, reuse, epic or blend-R with optional suffixes "
                         f"-{'/-'.join(DEVIATIONS)} (deviation), -{'/-'.join(SELECTIONS)} (selection) and -cN "
                         "(check layer), e.g. blend-0.15-key-c3")
    ratio = float(m.group(1))
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mode {name!r}: the recompute ratio must be in [0, 1], got {ratio}")
    deviation = m.group(2)[1:] if m.group(2) else "value"
    selection = m.group(3)[1:] if m.group(3) else "deviation"
    check_layer = int(m.group(4)[2:]) if m.group(4) else None
    canonical = f"blend-{ratio:.2f}" + (f"-{deviation}" if deviation != "value" else "") \
        + (f"-{selection}" if selection != "deviation" else "") + (f"-c{check_layer}" if check_layer is not None else "")
    return ModeSpec(canonical, "blend", ratio, deviation, selection, check_layer)


def parse_modes(names) -> list[ModeSpec]:
    """Mode specs in the given order, `full` first (always run: it is the reference), no duplicates."""
    specs = {s.name: s for s in map(parse_mode, [n.strip() for n in names if n.strip()])}
    specs.pop("full", None)
    return [parse_mode("full"), *specs.values()]


@dataclass
class BenchConfig:
    data: Path = DEFAULT_DATA
    limit: int | None = None
    modes: tuple[str, ...] = DEFAULT_MODES
    max_new_tokens: int = 32
    threads: int | None = None
    model: str = "default"
    store: Path | None = None  # None: .cache/bench-store/<model>-<kv dtype>
    kv_dtype: str = "float16"
    check_layer: int | None = None  # None: the config default
    rebuild_store: bool = False
    warmup: bool = True
    out_dir: Path = RESULTS_DIR
    readme: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    def store_dir(self) -> Path:
        return Path(self.store) if self.store else DEFAULT_STORE_ROOT / f"{slug(self.model)}-{self.kv_dtype}"


def run_benchmark(cfg: BenchConfig, *, lm=None, embedder=None) -> dict:
    """Run the benchmark and write its JSON, markdown and PNG; returns the result (with "paths").

    lm, embedder: already-loaded models (tests inject a tiny model); default: load `cfg.model`.
    """
    from chunkcache import RAGPipeline

    from bench import report

    specs = parse_modes(cfg.modes)
    questions = load_questions(cfg.data, cfg.limit)
    store_dir = cfg.store_dir()
    if cfg.rebuild_store:
        remove_store(store_dir)
    overrides = {"kv_dtype": cfg.kv_dtype}
    overrides.update({k: v for k, v in (("threads", cfg.threads), ("check_layer", cfg.check_layer)) if v is not None})
    started = time.perf_counter()
    pipe = RAGPipeline.open(store_dir, model=cfg.model, lm=lm, embedder=embedder, **overrides)
    try:
        env = environment(pipe)
        config = {**env, "data": str(cfg.data), "questions": len(questions), "max_new_tokens": cfg.max_new_tokens,
                  "modes": [s.name for s in specs], "store_dir": str(store_dir), "warmup": cfg.warmup}
        print(format_config(config), flush=True)
        store = build_store(pipe, passage_documents(questions, Path(cfg.data).stem), progress=cfg.progress)
        print("store: " + format_store(store), flush=True)
        if cfg.warmup:
            warm_up(pipe, questions[0], specs)
        rows = run_questions(pipe, questions, specs, cfg)
    finally:
        pipe.close()
    seconds = time.perf_counter() - started
    result = {"kind": RESULT_KIND, "version": 1, "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "config": config, "seconds_total": seconds, "store": store,
              "modes": {s.name: s.kwargs() for s in specs},
              "summary": summarize(rows, specs), "questions": rows}
    name = f"{dt.date.today().isoformat()}-{Path(cfg.data).stem}-n{len(questions)}-{slug(env['model'])}" \
           f"-{env['kv_dtype']}-t{env['threads']}"
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = next_free_path(cfg.out_dir / f"{name}.json")
    json_path.write_text(dump_json(result))
    paths = report.write_report(json_path)
    result["paths"] = {"json": str(json_path), **{k: str(v) for k, v in paths.items()}}
    print(Path(paths["md"]).read_text())
    print(f"wrote {json_path}, {paths['md']}, {paths['png']} ({seconds / 60:.1f} min in all)")
    if cfg.readme:
        report.update_readme(cfg.readme, json_path)
        print(f"updated the benchmark section of {cfg.readme}")
    return result


def run_questions(pipe, questions: list[Question], specs: list[ModeSpec], cfg: BenchConfig) -> list[dict]:
    others = specs[1:]
    bar = tqdm(total=len(questions) * len(specs), unit="run", disable=not cfg.progress, dynamic_ncols=True)
    rows = []
    try:
        for number, q in enumerate(questions):
            bar.set_description(q.id)
            started = time.perf_counter()
            bar.set_postfix(mode="full", refresh=True)
            full, full_answer, forced, reference = run_full(pipe, q, cfg.max_new_tokens)
            row = {"id": q.id, "question": q.question, "answers": list(q.answers), "full_answer": full_answer,
                   "forced_ids": forced, "modes": {"full": full}}
            bar.update(1)
            # Rotate the order per question so that no mode always runs right after full.
            shift = number % len(others) if others else 0
            for spec in others[shift:] + others[:shift]:
                bar.set_postfix(mode=spec.name, refresh=True)
                row["modes"][spec.name] = run_mode(pipe, q, spec, forced, reference, full_answer, cfg.max_new_tokens)
                bar.update(1)
            row["modes"] = {s.name: row["modes"][s.name] for s in specs}
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
    finally:
        bar.close()
    return rows


def run_full(pipe, q: Question, max_new_tokens: int):
    """Full prefill's row, its free-running answer text, that answer as forced ids, and full's
    teacher-forced log-probs along it (fp32 [len(forced), vocab]: the fidelity reference)."""
    logprobs, answer = pipe.evaluate(q.question, None, documents=list(q.documents), mode="full",
                                     max_new_tokens=max_new_tokens)
    forced = forced_ids(answer, pipe.rt.lm, max_new_tokens)
    if logprobs is not None and logprobs.shape[0] >= len(forced):
        reference = logprobs[:len(forced)]
    else:
        # NOTE: a second full prefill, only because evaluate() does not hand back the free-running
        # steps' distributions (which are exactly full's teacher-forced ones along its own answer).
        reference, _ = pipe.evaluate(q.question, forced, documents=list(q.documents), mode="full",
                                     max_new_tokens=max_new_tokens, free_running=False)
    row = mode_row(answer, metrics.fidelity(reference, reference), answer.text, q)
    return row, answer.text, forced, reference


def run_mode(pipe, q: Question, spec: ModeSpec, forced: list[int], reference, full_text: str,
             max_new_tokens: int) -> dict:
    logprobs, answer = pipe.evaluate(q.question, forced, documents=list(q.documents),
                                     max_new_tokens=max_new_tokens, free_running=True, **spec.kwargs())
    return mode_row(answer, metrics.fidelity(reference, logprobs), full_text, q)


def forced_ids(answer, lm, max_new_tokens: int) -> list[int]:
    """Full's greedy answer as the teacher-forced sequence, with its EOS when it stopped early.

    The last forced token is never fed to the model (row i predicts token i from tokens < i), so the
    EOS only adds the row where full chose to stop; which EOS id it is does not matter.
    """
    ids = list(answer.token_ids[:max_new_tokens])
    if answer.finish_reason == "stop" and len(ids) < max_new_tokens:
        eos = lm.tokenizer.eos_token_id
        ids.append(eos if eos in lm.eos_token_ids else min(lm.eos_token_ids))
    if not ids:
        raise AssertionError(f"full's answer gave no token to force (finish {answer.finish_reason!r})")
    return ids


def ttft_of(answer) -> float:
    t = answer.timings
    return t.retrieve_s + t.load_s + t.prefill_s


def mode_row(answer, fid: dict, full_text: str, q: Question) -> dict:
    decode_steps = max(1, answer.stats.completion_tokens)
    return {
        "ttft_s": ttft_of(answer), "answer_ttft_s": answer.ttft_s, "timings": asdict(answer.timings),
        "decode_s_per_token": answer.timings.decode_s / decode_steps, "stats": asdict(answer.stats),
        "text": answer.text, "finish_reason": answer.finish_reason,
        "kl_mean": fid["kl_mean"], "kl_first": fid["kl_first"], "top1": fid["top1"],
        "kl": fid["kl"], "top1_positions": fid["top1_positions"],
        "f1_vs_full": metrics.token_f1(answer.text, full_text), "f1_gold": metrics.best_f1(answer.text, q.answers),
    }


def summarize(rows: list[dict], specs: list[ModeSpec]) -> dict:
    """Per mode: TTFT median/p90, speed-ups vs full, recompute fraction, fidelity and F1 means."""
    full_ttft = [r["modes"]["full"]["ttft_s"] for r in rows]
    out = {}
    for spec in specs:
        runs = [r["modes"][spec.name] for r in rows]
        ttft = [m["ttft_s"] for m in runs]
        out[spec.name] = {
            "settings": spec.kwargs(), "questions": len(runs),
            "ttft_median_s": metrics.median(ttft), "ttft_p90_s": metrics.p90(ttft),
            "speedup": metrics.median(full_ttft) / metrics.median(ttft),
            "speedup_median": metrics.median([f / t for f, t in zip(full_ttft, ttft)]),
            "recompute_fraction": metrics.mean([m["stats"]["recompute_fraction"] for m in runs]),
            "kl_mean": metrics.mean([m["kl_mean"] for m in runs]),
            "kl_first": metrics.mean([m["kl_first"] for m in runs]),
            "top1": metrics.mean([m["top1"] for m in runs]),
            "f1_vs_full": metrics.mean([m["f1_vs_full"] for m in runs]),
            "f1_gold": metrics.mean([m["f1_gold"] for m in runs]),
            "prompt_tokens_mean": metrics.mean([m["stats"]["prompt_tokens"] for m in runs]),
            "chunk_misses": sum(m["stats"]["chunk_misses"] for m in runs),
            "dropped_chunks": sum(m["stats"]["dropped_chunks"] for m in runs),
            "decode_s_per_token": metrics.median([m["decode_s_per_token"] for m in runs]),
        }
    return out


def warm_up(pipe, q: Question, specs: list[ModeSpec]) -> None:
    """One short call per mode kind (two passages, two tokens), not recorded: first calls pay one-off costs."""
    seen = set()
    for spec in specs:
        if spec.mode not in seen:
            seen.add(spec.mode)
            pipe.evaluate(q.question, None, documents=list(q.documents[:2]), max_new_tokens=2, **spec.kwargs())


def remove_store(path: Path) -> None:
    """Delete a benchmark store, refusing anything that does not look like one."""
    if not path.exists():
        return
    if not (path / "kv.lmdb").exists() and any(path.iterdir()):
        raise ValueError(f"--rebuild-store: {path} is not a chunkcache store (no kv.lmdb); refusing to delete it")
    shutil.rmtree(path)


def slug(text: str) -> str:
    if text == "default":
        from chunkcache.models import DEFAULT_MODEL_NAME
        text = DEFAULT_MODEL_NAME
    return re.sub(r"[^a-z0-9.]+", "-", Path(str(text)).name.lower()).strip("-") or "model"


def format_config(c: dict) -> str:
    return "\n".join([
        f"chunkcache RAG benchmark: {c['questions']} questions from {c['data']}",
        f"  model {c['model']} fingerprint {c['model_fingerprint']}",
        f"  compute {c['compute_dtype']} on {c['device']}, KV {c['kv_dtype']}, check layer {c['check_layer']}, "
        f"epic tokens {c['epic_tokens']}, max new tokens {c['max_new_tokens']}",
        f"  {c['threads']} threads, torch {c['torch']}, transformers {c['transformers']}, CPU {c['cpu']}",
        f"  commit {c['git_commit']}{' (tracked files modified)' if c['git_dirty'] else ''}",
        f"  store {c['store_dir']}",
        f"  modes {', '.join(c['modes'])}",
    ])


def format_store(s: dict) -> str:
    if not s["chunks_computed"]:
        return (f"{s['chunks']} chunks, {s['tokens']:,} tokens, all already stored (--rebuild-store to time it); "
                f"{s['bytes_per_token']:,.0f} B/token")
    return (f"{s['chunks_computed']} of {s['chunks']} chunks computed, {s['tokens_computed']:,} tokens in "
            f"{s['seconds']:.1f} s ({s['tokens_per_s']:.0f} tokens/s); {s['bytes_per_token']:,.0f} B/token "
            f"({s['size_vs_fp16']:.2f} x fp16)")


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"questions JSONL (default {DEFAULT_DATA})")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma-separated modes (full always runs); default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length, forced and free (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--model", default="default", help="LLM: default (SmolLM2-135M-Instruct), a HF id or a dir")
    p.add_argument("--store", type=Path, default=None,
                   help=f"store directory (default {DEFAULT_STORE_ROOT.relative_to(REPO_ROOT)}/<model>-<kv dtype>)")
    p.add_argument("--kv-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--check-layer", type=int, default=None, help="blend check layer (default: the config's, 1)")
    p.add_argument("--rebuild-store", action="store_true", help="delete the store first, so its build is timed")
    p.add_argument("--no-warmup", action="store_true", help="skip the unrecorded warm-up calls")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where results go (default bench/results)")
    p.add_argument("--readme", nargs="?", const=REPO_ROOT / "README.md", type=Path, default=None,
                   help="rewrite the <!-- bench:start/end --> section of README.md (or the file given)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return BenchConfig(data=a.data, limit=a.limit, modes=tuple(a.modes.split(",")), max_new_tokens=a.max_new_tokens,
                       threads=a.threads, model=a.model, store=a.store, kv_dtype=a.kv_dtype, check_layer=a.check_layer,
                       rebuild_store=a.rebuild_store, warmup=not a.no_warmup, out_dir=a.out_dir, readme=a.readme,
                       progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m bench.run` (and `chunkcache bench`)."""
    try:
        cfg = parse_args(argv)
        parse_modes(cfg.modes)  # refuse a bad --modes before loading anything
        run_benchmark(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
