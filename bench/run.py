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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from bench import metrics
from bench.data import DEFAULT_DATA, REPO_ROOT, Question, load_questions, passage_documents
from bench.envinfo import dump_json, environment, next_free_path
from bench.ingest import build_store
from bench.oracles import oracle_scores
from bench.reference import CACHE_ROOT, ensure_references
from chunkcache.config import CHUNK_CONTEXTS, ChunkCacheConfig

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_STORE_ROOT = REPO_ROOT / ".cache" / "bench-store"
# The ratio sweep runs chunkcache's default (probe selection, calibrated chunk scale on the
# question's queries); beside it at 0.15: the previous defaults (impact selection with and without
# the scale), CacheBlend's deviation-only selection with and without it, and reuse with and without it.
DEFAULT_MODES = ("full", "reuse-soff", "reuse", "epic", "blend-0.05-probe", "blend-0.15-probe", "blend-0.30-probe",
                 "blend-0.15-impact", "blend-0.15-impact-soff", "blend-0.15-soff", "blend-0.15")
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
    chunk_scale: float | str | None = None  # None: the pipeline's ("calibrated")
    scale_queries: str | None = None
    oracle: str | None = None  # bench-only selection from full prefill's KV (bench/oracles.py)
    system_prompt: str | None = None  # the run's --system-prompt (every mode, full included, takes it)
    plain_entries: bool = False  # place plain entries where the store links context-enriched ones

    def kwargs(self) -> dict:
        """The `RAGPipeline.evaluate` keyword arguments of this mode (an oracle's scores come apart)."""
        out = {"mode": self.mode, **({"plain_entries": True} if self.plain_entries else {})}
        for name in ("recompute_ratio", "deviation", "selection", "check_layer", "chunk_scale", "scale_queries",
                     "system_prompt"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


MODE_HELP = ("full, reuse, epic or blend-R, with optional suffixes -key/-value (deviation), -{selections} "
             "(selection), -oracle/-oracleout (bench-only oracle selection), -cN (check layer), "
             "-soff/-scal/-sS (attention scale on reused chunks: off, calibrated, one S) and -qonly/-qall (the "
             "scale on the question's queries only, or on recomputed chunk tokens' too), -plain (the store's plain "
             "entries where it has context-enriched ones), e.g. blend-0.15-key-c3 or reuse-s0.5")


def parse_mode(name: str) -> ModeSpec:
    """`full`, `reuse[-s..]`, `epic[-s..]` or `blend-R[-<deviation>][-<selection>][-cN][-s..][-qonly|-qall]`."""
    from bench.oracles import ORACLES
    from chunkcache.config import DEVIATIONS, SELECTIONS, check_chunk_scale

    helptext = MODE_HELP.format(selections="/-".join(SELECTIONS))
    if name == "full":
        return ModeSpec(name, name)
    head, *parts = name.split("-")
    if head not in ("reuse", "epic", "blend"):
        raise ValueError(f"unknown mode {name!r}; use {helptext}")
    fields: dict = {}
    canonical = head
    if head == "blend":
        if not parts or not re.fullmatch(r"\d*\.?\d+", parts[0]):
            raise ValueError(f"unknown mode {name!r}: blend needs a recompute ratio (blend-0.15); use {helptext}")
        ratio = float(parts.pop(0))
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mode {name!r}: the recompute ratio must be in [0, 1], got {ratio}")
        fields.update(recompute_ratio=ratio, deviation="value", selection="deviation")
        canonical += f"-{ratio:.2f}"
    order = ("deviation", "selection", "check_layer", "chunk_scale", "scale_queries", "plain_entries")
    seen = -1
    for part in parts:
        if head == "blend" and part in DEVIATIONS:
            key, value, text = "deviation", part, part
        elif head == "blend" and part in SELECTIONS:
            key, value, text = "selection", part, part
        elif head == "blend" and part in ORACLES:
            key, value, text = "selection", part, part
        elif head == "blend" and re.fullmatch(r"c\d+", part):
            key, value, text = "check_layer", int(part[1:]), part
        elif part in ("soff", "scal"):
            key, value, text = "chunk_scale", {"soff": "off", "scal": "calibrated"}[part], part
        elif re.fullmatch(r"s\d*\.?\d+", part):
            key, value = "chunk_scale", float(part[1:])
            check_chunk_scale(value)
            text = f"s{value:g}"
        elif part in ("qonly", "qall"):
            key, value, text = "scale_queries", {"qonly": "question", "qall": "all"}[part], part
        elif part == "plain":
            key, value, text = "plain_entries", True, part
        else:
            raise ValueError(f"unknown mode {name!r} (at {part!r}); use {helptext}")
        if order.index(key) <= seen:
            raise ValueError(f"mode {name!r}: suffixes out of order or repeated; use {helptext}")
        seen = order.index(key)
        fields[key] = value
        if not (key == "deviation" and value == "value"):
            canonical += f"-{text}"
    if fields.get("selection") in ORACLES:
        fields["oracle"] = fields.pop("selection")
        fields["selection"] = "deviation"
    return ModeSpec(canonical, head, **fields)


def parse_modes(names) -> list[ModeSpec]:
    """Mode specs in the given order, `full` first (always run: it is the reference), no duplicates."""
    specs = {s.name: s for s in map(parse_mode, [n.strip() for n in names if n.strip()])}
    specs.pop("full", None)
    return [parse_mode("full"), *specs.values()]


@dataclass
class BenchConfig:
    data: Path = DEFAULT_DATA
    limit: int | None = None
    first: int = 0  # skip the questions before this one (--questions A-B: first=A, limit=B+1)
    free_running: bool = True  # False: modes other than full are teacher-forced only (no F1, faster)
    cached_full: bool = False  # full's answer from bench.reference's cache: fidelity only, no speed-ups
    modes: tuple[str, ...] = DEFAULT_MODES
    max_new_tokens: int = 32
    threads: int | None = None
    model: str = "default"
    store: Path | None = None  # None: .cache/bench-store/<model>-<kv dtype>
    kv_dtype: str = "float16"
    chunk_context: str = ChunkCacheConfig.chunk_context  # the store's recipe (chunkcache/context.py)
    check_layer: int | None = None  # None: the config default
    system_prompt: str | None = None  # every mode's own system prompt instead of the store's (None: the store's)
    rebuild_store: bool = False
    warmup: bool = True
    out_dir: Path = RESULTS_DIR
    readme: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.system_prompt is not None and self.cached_full:
            raise ValueError("--cached-full holds full's references under the store's system prompt; with "
                             "--system-prompt, full runs for real")

    def store_dir(self) -> Path:
        if self.store:
            return Path(self.store)
        recipe = "" if self.chunk_context == "none" else f"-{self.chunk_context}"
        return DEFAULT_STORE_ROOT / f"{slug(self.model)}-{self.kv_dtype}{recipe}"


def run_benchmark(cfg: BenchConfig, *, lm=None, embedder=None) -> dict:
    """Run the benchmark and write its JSON, markdown and PNG; returns the result (with "paths").

    lm, embedder: already-loaded models (tests inject a tiny model); default: load `cfg.model`.
    """
    from chunkcache import RAGPipeline

    from bench import report

    specs = [replace(s, system_prompt=cfg.system_prompt) for s in parse_modes(cfg.modes)]
    questions = load_questions(cfg.data, cfg.limit)[cfg.first:]
    if not questions:
        raise ValueError(f"no questions left after skipping the first {cfg.first}")
    store_dir = cfg.store_dir()
    if cfg.rebuild_store:
        remove_store(store_dir)
    overrides = {"kv_dtype": cfg.kv_dtype, "chunk_context": cfg.chunk_context}
    overrides.update({k: v for k, v in (("threads", cfg.threads), ("check_layer", cfg.check_layer)) if v is not None})
    started = time.perf_counter()
    pipe = RAGPipeline.open(store_dir, model=cfg.model, lm=lm, embedder=embedder, **overrides)
    try:
        env = environment(pipe)
        config = {**env, "data": str(cfg.data), "questions": len(questions), "first_question": cfg.first,
                  "free_running": cfg.free_running, "max_new_tokens": cfg.max_new_tokens,
                  "modes": [s.name for s in specs], "store_dir": str(store_dir), "warmup": cfg.warmup,
                  "system_prompt": cfg.system_prompt}
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
            if cfg.cached_full:
                full, full_answer, forced, reference = cached_full(pipe, q, cfg.max_new_tokens)
            else:
                full, full_answer, forced, reference = run_full(pipe, q, cfg.max_new_tokens, specs[0].system_prompt)
            row = {"id": q.id, "question": q.question, "answers": list(q.answers), "full_answer": full_answer,
                   "forced_ids": forced, "modes": {"full": full}}
            bar.update(1)
            # Rotate the order per question so that no mode always runs right after full.
            shift = number % len(others) if others else 0
            oracle_ref = None
            for spec in others[shift:] + others[:shift]:
                bar.set_postfix(mode=spec.name, refresh=True)
                extra = {}
                if spec.oracle:
                    oracle_ref = oracle_ref or question_reference(pipe, q, cfg.max_new_tokens)
                    check_layer = spec.check_layer if spec.check_layer is not None else pipe.config.check_layer
                    extra["selection_scores"] = oracle_scores(oracle_ref, spec.oracle, check_layer)
                row["modes"][spec.name] = run_mode(pipe, q, spec, forced, reference, full_answer, cfg.max_new_tokens,
                                                   free_running=cfg.free_running, **extra)
                bar.update(1)
            row["modes"] = {s.name: row["modes"][s.name] for s in specs}
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
    finally:
        bar.close()
    return rows


def cached_full(pipe, q: Question, max_new_tokens: int):
    """`run_full`'s results from bench.reference's cache (no timed full prefill: TTFT figures are NaN)."""
    ref = question_reference(pipe, q, max_new_tokens)
    nan = float("nan")
    fid = metrics.fidelity(ref["reference"], ref["reference"])
    row = {"ttft_s": nan, "answer_ttft_s": nan, "timings": {}, "decode_s_per_token": nan,
           "stats": {"recompute_fraction": 1.0, "prompt_tokens": ref["prefix_len"] + sum(ref["chunk_lens"])
                     + ref["suffix_len"], "chunk_misses": 0, "dropped_chunks": 0},
           "text": ref["full_answer"], "finish_reason": None, **{k: fid[k] for k in ("kl_mean", "kl_first", "top1")},
           "kl": fid["kl"], "top1_positions": fid["top1_positions"], "f1_vs_full": 1.0,
           "f1_gold": metrics.best_f1(ref["full_answer"], q.answers)}
    return row, ref["full_answer"], list(ref["forced_ids"]), ref["reference"]


def run_full(pipe, q: Question, max_new_tokens: int, system_prompt: str | None = None):
    """Full prefill's row, its free-running answer text, that answer as forced ids, and full's
    teacher-forced log-probs along it (fp32 [len(forced), vocab]: the fidelity reference)."""
    logprobs, answer = pipe.evaluate(q.question, None, documents=list(q.documents), mode="full",
                                     max_new_tokens=max_new_tokens, system_prompt=system_prompt)
    forced = forced_ids(answer, pipe.rt.lm, max_new_tokens)
    if logprobs is not None and logprobs.shape[0] >= len(forced):
        reference = logprobs[:len(forced)]
    else:
        # NOTE: a second full prefill, only because evaluate() does not hand back the free-running
        # steps' distributions (which are exactly full's teacher-forced ones along its own answer).
        reference, _ = pipe.evaluate(q.question, forced, documents=list(q.documents), mode="full",
                                     max_new_tokens=max_new_tokens, free_running=False, system_prompt=system_prompt)
    row = mode_row(answer, metrics.fidelity(reference, reference), answer.text, q)
    return row, answer.text, forced, reference


def run_mode(pipe, q: Question, spec: ModeSpec, forced: list[int], reference, full_text: str,
             max_new_tokens: int, free_running: bool = True, **extra) -> dict:
    logprobs, answer = pipe.evaluate(q.question, forced, documents=list(q.documents),
                                     max_new_tokens=max_new_tokens, free_running=free_running, **spec.kwargs(),
                                     **extra)
    return mode_row(answer, metrics.fidelity(reference, logprobs), full_text, q)


def question_reference(pipe, q: Question, max_new_tokens: int) -> dict:
    """Full prefill's per-token statistics for the oracles (bench/reference.py; cached on disk)."""
    root = CACHE_ROOT / pipe.rt.lm.fingerprint[:16]
    return ensure_references(pipe, [q], root, max_new_tokens, progress=False)[0]


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
    free_running = answer.ttft_s == answer.ttft_s  # NaN without a free-running answer (--forced-only)
    return {
        "ttft_s": ttft_of(answer), "answer_ttft_s": answer.ttft_s, "timings": asdict(answer.timings),
        "decode_s_per_token": answer.timings.decode_s / decode_steps, "stats": asdict(answer.stats),
        "text": answer.text, "finish_reason": answer.finish_reason,
        "kl_mean": fid["kl_mean"], "kl_first": fid["kl_first"], "top1": fid["top1"],
        "kl": fid["kl"], "top1_positions": fid["top1_positions"],
        "f1_vs_full": metrics.token_f1(answer.text, full_text) if free_running else float("nan"),
        "f1_gold": metrics.best_f1(answer.text, q.answers) if free_running else float("nan"),
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
    p.add_argument("--questions", default=None, metavar="A-B",
                   help="only questions A to B (0-based, inclusive), e.g. 25-49 (the half not used for fitting)")
    p.add_argument("--cached-full", action="store_true",
                   help="take full's answer and distributions from bench.reference's cache instead of a timed "
                        "full run (for fitting and exploring fidelity; no speed-ups)")
    p.add_argument("--forced-only", action="store_true",
                   help="modes other than full are only teacher-forced (fidelity and TTFT; no free-running F1)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma-separated modes (full always runs); default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length, forced and free (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--model", default="default", help="LLM: default (SmolLM2-135M-Instruct), a HF id or a dir")
    p.add_argument("--store", type=Path, default=None,
                   help=f"store directory (default {DEFAULT_STORE_ROOT.relative_to(REPO_ROOT)}/<model>-<kv dtype>)")
    p.add_argument("--kv-dtype", default="float16", choices=("float16", "bfloat16", "float32", "int8"))
    p.add_argument("--chunk-context", default=ChunkCacheConfig.chunk_context, choices=CHUNK_CONTEXTS,
                   help="the store's chunk entries: after the prefix only (none) or also after each chunk's nearest "
                        "neighbour (neighbour); each has its own default store (default %(default)s)")
    p.add_argument("--check-layer", type=int, default=None, help="blend check layer (default: the config's, 0)")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="every mode (full too) runs under this system prompt instead of the store's: what a "
                        "request's own system prompt costs (no chunk is then exact where it sits)")
    p.add_argument("--rebuild-store", action="store_true", help="delete the store first, so its build is timed")
    p.add_argument("--no-warmup", action="store_true", help="skip the unrecorded warm-up calls")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where results go (default bench/results)")
    p.add_argument("--readme", nargs="?", const=REPO_ROOT / "README.md", type=Path, default=None,
                   help="rewrite the <!-- bench:start/end --> section of README.md (or the file given)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    first, limit = 0, a.limit
    if a.questions:
        m = re.fullmatch(r"(\d+)-(\d+)", a.questions)
        if not m or int(m.group(1)) > int(m.group(2)):
            p.error(f"--questions must be A-B with A <= B, got {a.questions!r}")
        first, limit = int(m.group(1)), int(m.group(2)) + 1
    return BenchConfig(data=a.data, limit=limit, first=first, free_running=not a.forced_only, cached_full=a.cached_full,
                       modes=tuple(a.modes.split(",")), max_new_tokens=a.max_new_tokens,
                       threads=a.threads, model=a.model, store=a.store, kv_dtype=a.kv_dtype,
                       chunk_context=a.chunk_context, check_layer=a.check_layer,
                       system_prompt=a.system_prompt,
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
