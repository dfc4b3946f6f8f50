"""Benchmark report: markdown table and plot from a run's JSON, and the README's benchmark section.

    python -m bench.report                        # the latest run in bench/results: print its table
    python -m bench.report --json RUN.json --readme   # ... and rewrite README.md between the markers

Every figure comes from the JSON files (`bench.run`'s, plus the latest bench/results/ingest-*.json
and http-*.json beside it when present): nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
RUN_KIND = "chunkcache-bench-rag"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_report(json_path: Path) -> dict[str, Path]:
    """Write the .md table and the .png plot beside a run's JSON; returns their paths."""
    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    png, md = json_path.with_suffix(".png"), json_path.with_suffix(".md")
    plot(result, png)
    md.write_text(markdown(result, json_path, image=png.name) + "\n")
    return {"md": md, "png": png}


def markdown(result: dict, json_path: Path, image: str | None = None) -> str:
    """The run's table, its configuration, the store build, and any ingest/HTTP results beside it."""
    c, s = result["config"], result["summary"]
    full = s["full"]
    first = c.get("first_question", 0)
    which = f"questions {first}-{first + c['questions'] - 1}" if first else f"{c['questions']} questions"
    lines = [f"### {Path(c['data']).stem}: {which}, {c['model']} "
             f"({result['created'][:10]}, `{json_path.name}`)", "",
             "| mode | recompute | TTFT p50 | TTFT p90 | speed-up | speed-up (per-question median) | mean KL | "
             "first-token KL | top-1 agree | F1 vs full | MuSiQue F1 |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, m in s.items():
        lines.append(f"| {name} | {m['recompute_fraction']:.1%} | {m['ttft_median_s']:.2f} s | {m['ttft_p90_s']:.2f} s "
                     f"| {m['speedup']:.2f}x | {m['speedup_median']:.2f}x | {_num(m['kl_mean'])} | "
                     f"{_num(m['kl_first'])} | {m['top1']:.3f} | {_f1(m['f1_vs_full'])} | {_f1(m['f1_gold'])} |")
    misses = sum(m["chunk_misses"] for n, m in s.items() if n != "full")
    dropped = sum(m["dropped_chunks"] for m in s.values())
    lines += ["",
              f"Fidelity is teacher-forced along full's greedy answer (its first {c['max_new_tokens']} tokens, EOS "
              "included): KL(full || mode) and top-1 agreement of the next-token distributions, averaged over "
              "positions, then over questions; first-token KL is position 0 alone. F1 vs full compares each mode's "
              "own greedy answer with full's; MuSiQue F1 is against the gold answers (SQuAD normalization, best "
              "alias). TTFT = retrieval + KV loading + prefill, all modes interleaved per question in one run; "
              f"speed-up = full's median TTFT / the mode's ({full['ttft_median_s']:.2f} s for full), and the "
              "median of per-question ratios. Recompute is the mean share of chunk tokens recomputed."
              + ("" if c.get("free_running", True) else " This run was teacher-forced only (--forced-only): no "
                 "mode but full decoded its own answer, so F1 is n/a.")
              + (f" Chunk misses during timed calls: {misses}." if misses else "")
              + (f" Chunks dropped to fit the context: {dropped}." if dropped else ""),
              "",
              f"Configuration: model `{c['model']}` (fingerprint `{c['model_fingerprint'][:16]}`), {c['compute_dtype']} "
              f"on {c['device']}, KV cache {c['kv_dtype']}, check layer {c['check_layer']}, EPIC tokens "
              f"{c['epic_tokens']}, {c['threads']} threads, torch {c['torch']}, transformers {c['transformers']}, "
              f"CPU {c['cpu']}, commit `{c['git_commit'][:12]}`{' (tracked files modified)' if c['git_dirty'] else ''}; "
              f"{full['prompt_tokens_mean']:,.0f} prompt tokens on average; data `{c['data']}`; "
              f"{result['seconds_total'] / 60:.1f} min in all."
              + (f" Every mode, full included, ran under the system prompt {c['system_prompt']!r} instead of the "
                 "store's." if c.get("system_prompt") else ""),
              "", "Store build: " + _store_line(result["store"])]
    lines += split_section(result)
    if image:
        lines += ["", f"![fidelity vs TTFT speed-up]({image})"]
    extras = extra_sections(Path(json_path).parent)
    return "\n".join(lines + extras)


# The dev questions the shipped calibration was fitted on (chunkcache/calibrations/*.json "fit");
# figures on the others are held out.
FIT_QUESTIONS = range(0, 25)


def split_section(result: dict) -> list[str]:
    """Mean KL and top-1 per mode on the fit questions and on the held-out ones, when the run has both."""
    first = result["config"].get("first_question", 0)
    rows = result["questions"]
    halves = {"fit": [r for i, r in enumerate(rows, first) if i in FIT_QUESTIONS],
              "held out": [r for i, r in enumerate(rows, first) if i not in FIT_QUESTIONS]}
    if not halves["held out"]:
        return ["", f"All {len(rows)} questions of this run are in the calibration's fit half "
                    f"({FIT_QUESTIONS.start}-{FIT_QUESTIONS.stop - 1})."]
    if not halves["fit"]:
        return ["", f"All {len(rows)} questions of this run are held out: no fitted constant saw them."]
    n_fit, n_held = len(halves["fit"]), len(halves["held out"])
    lines = ["", f"By half: questions {FIT_QUESTIONS.start}-{FIT_QUESTIONS.stop - 1} ({n_fit}) fitted the "
                 f"calibrated constants and chose the defaults; the other {n_held} are held out.", "",
             "| mode | mean KL (fit) | top-1 (fit) | mean KL (held out) | top-1 (held out) |", "|---|--:|--:|--:|--:|"]
    for name in result["summary"]:
        cells = []
        for half in ("fit", "held out"):
            runs = [r["modes"][name] for r in halves[half]]
            cells += [_num(sum(m["kl_mean"] for m in runs) / len(runs)), f"{sum(m['top1'] for m in runs) / len(runs):.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _store_line(st: dict) -> str:
    size = (f"store {st['bytes_per_token']:,.0f} B/token ({st['size_vs_fp16']:.2f} x the fp16 figure, "
            f"{st['fp16_bytes_per_token']:,} B/token)")
    if not st["chunks_computed"]:
        return f"{st['chunks']} chunks ({st['tokens']:,} tokens) were already stored, not timed; {size}."
    return (f"{st['chunks_computed']} chunks, {st['tokens_computed']:,} tokens in {st['seconds']:.1f} s "
            f"({st['chunks_per_s']:.2f} chunks/s, {st['tokens_per_s']:.0f} tokens/s; KV compute alone "
            f"{st['kv_tokens_per_s']:.0f} tokens/s); {size}.")


def extra_sections(results_dir: Path) -> list[str]:
    """Sections from the latest ingest-*.json and http-*.json in `results_dir`, when present."""
    out = []
    ingest = latest(results_dir, "ingest-*.json")
    if ingest:
        data = json.loads(ingest.read_text())
        f, c = data["ingest"], data["config"]
        out += ["", f"Ingest (`{ingest.name}`, {c['passages']} passages, {c['threads']} threads, KV {c['kv_dtype']}"
                f"{', embedding included' if f.get('embedded') else ''}): " + _store_line(f)]
    http = latest(results_dir, "http-*.json")
    if http:
        out += ["", f"HTTP (`{http.name}`):", "", *http_section(json.loads(http.read_text()))]
    return out


def http_section(data: dict) -> list[str]:
    """`bench.http`'s own table for its JSON (config, ttft, load, baseline); any other layout generically."""
    if isinstance(data, dict) and {"config", "ttft", "load"} <= data.keys():
        from bench.http import markdown as http_markdown

        return [http_markdown(data["config"], data["ttft"], data["load"], data.get("baseline"))]
    return generic_section(data)


def generic_section(data: dict) -> list[str]:
    """A result file of another benchmark: its own markdown if it has one, else its figures as a table."""
    if isinstance(data.get("markdown"), str):
        return [data["markdown"].strip()]
    for key in ("summary", "results", "rows"):
        rows = data.get(key)
        if isinstance(rows, dict) and rows and all(isinstance(v, dict) for v in rows.values()):
            rows = [{"name": k, **v} for k, v in rows.items()]
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            cols = [k for k in rows[0] if all(_scalar(r.get(k)) for r in rows)]
            return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                    + ["| " + " | ".join(_cell(r.get(k)) for k in cols) + " |" for r in rows])
    scalars = {k: v for k, v in data.items() if _scalar(v) and k not in ("kind", "version")}
    return [", ".join(f"{k} {_cell(v)}" for k, v in scalars.items())]


def plot(result: dict, path: Path) -> None:
    """Mean KL (log) and top-1 agreement vs TTFT speed-up, one point per mode, Pareto fronts drawn,
    and mean KL vs the recompute fraction, one curve per selection policy (runs without timed
    speed-ups, e.g. --cached-full, get only the last panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    names = list(s)
    speed = [s[n]["speedup"] for n in names]
    kl = [s[n]["kl_mean"] for n in names]
    top1 = [s[n]["top1"] for n in names]
    positive = [k for k in kl if k > 0]
    floor = min(positive) / 3 if positive else 1e-6
    timed = all(math.isfinite(x) and x > 0 for x in speed)
    fig, axes = plt.subplots(1, 3 if timed else 1, figsize=(18 if timed else 7, 5), squeeze=False)
    axes = axes[0]
    panels = ((axes[0], [max(k, floor) for k in kl], "mean KL(full || mode), log scale", True),
              (axes[1], top1, "top-1 agreement with full", False)) if timed else ()
    for ax, ys, y_label, lower_better in panels:
        front = pareto_front(speed, ys, lower_better)
        ax.scatter(speed, ys, color="tab:blue", zorder=3)
        fx, fy = zip(*sorted((speed[i], ys[i]) for i in front))
        ax.plot(fx, fy, color="tab:orange", label="Pareto front", zorder=2)
        for n, x, y, k in zip(names, speed, ys, kl):
            label_text = n + (" (KL ~0, clipped)" if lower_better and k < floor else "")
            ax.annotate(label_text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        if lower_better:
            ax.set_yscale("log")
        ax.set_xlabel("TTFT speed-up vs full (ratio of medians, log scale)")
        ax.set_ylabel(y_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best")
    recompute_curves(axes[-1], s, floor)
    c = result["config"]
    fig.suptitle(f"{Path(c['data']).stem}, {c['questions']} questions, {c['model']}, KV {c['kv_dtype']}, "
                 f"{c['threads']} threads ({result['created'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def policy_curves(summary: dict) -> dict[str, list[tuple[float, float]]]:
    """Modes grouped by policy (the name without its ratio): {policy: [(recompute fraction, mean KL)]}."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, m in summary.items():
        if name == "full":
            continue
        policy = re.sub(r"^blend-[0-9.]+", "blend", name)
        curves.setdefault(policy, []).append((m["recompute_fraction"], m["kl_mean"]))
    return {p: sorted(points) for p, points in curves.items()}


def recompute_curves(ax, summary: dict, floor: float) -> None:
    for policy, points in policy_curves(summary).items():
        xs, ys = zip(*points)
        ax.plot(xs, [max(y, floor) for y in ys], marker="o", label=policy,
                linestyle="--" if "oracle" in policy else "-")
    ax.set_yscale("log")
    ax.set_xlabel("recompute fraction of chunk tokens")
    ax.set_ylabel("mean KL(full || mode), log scale")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=7)


def pareto_front(speed: list[float], quality: list[float], lower_better: bool) -> list[int]:
    """Indices of the points no other point beats on both speed-up (higher) and quality."""
    def dominated(i: int) -> bool:
        for j in range(len(speed)):
            better_q = quality[j] < quality[i] if lower_better else quality[j] > quality[i]
            same_q = quality[j] == quality[i]
            if j != i and speed[j] >= speed[i] and (better_q or same_q) and (speed[j] > speed[i] or better_q):
                return True
        return False

    return [i for i in range(len(speed)) if not dominated(i)]


def update_readme(readme: Path, json_path: Path) -> None:
    """Rewrite the section between the bench markers of `readme` with the run's table and plot link."""
    readme, json_path = Path(readme), Path(json_path)
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{readme} needs exactly one {START} ... {END} pair (in that order) to rewrite; add them "
                         "where the benchmark section goes")
    result = json.loads(json_path.read_text())
    image = os.path.relpath(json_path.with_suffix(".png"), readme.parent)
    if not json_path.with_suffix(".png").exists():
        plot(result, json_path.with_suffix(".png"))
    body = markdown(result, json_path, image=Path(image).as_posix())
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{body}\n{END}{tail}")


def latest(results_dir: Path, pattern: str) -> Path | None:
    """The newest file matching `pattern`, by the "created" time recorded in it (then by name)."""
    found = []
    for p in Path(results_dir).glob(pattern):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            found.append((str(data.get("created", "")), p.name, p))
    return max(found)[2] if found else None


def latest_run(results_dir: Path) -> Path:
    """The newest `bench.run` result in `results_dir`."""
    runs = [p for p in Path(results_dir).glob("*.json") if _kind(p) == RUN_KIND]
    if not runs:
        raise ValueError(f"no benchmark run in {results_dir}; run `python -m bench.run` first")
    return max((json.loads(p.read_text())["created"], p.name, p) for p in runs)[2]


def _kind(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def _f1(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if math.isnan(x):
        return "n/a"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _cell(v) -> str:
    return _num(v) if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="a bench.run result (default: the latest in --results)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)")
    p.add_argument("--readme", nargs="?", const=README, type=Path, default=None,
                   help="rewrite the benchmark section of README.md (or the file given)")
    args = p.parse_args(argv)
    try:
        json_path = args.json or latest_run(args.results)
        paths = write_report(json_path)
        print(paths["md"].read_text())
        if args.readme:
            update_readme(args.readme, json_path)
            print(f"updated the benchmark section of {args.readme}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
