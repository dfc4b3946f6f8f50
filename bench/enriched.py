"""Context-enriched precompute (FusionRAG-style), measured before it is built: reuse mode's fidelity
when each chunk's stored KV was computed after its nearest neighbour chunk instead of the bare prefix.

    python -m bench.enriched --questions 0-49 --threads 2

For every question, its chunks' KV is assembled two ways and the question plus full's answer run over
it teacher-forced (`bench.calibrate`'s differentiable reuse forward, checked against `forward_tokens`):
  base      the store's entries: each chunk computed right after the prompt prefix (today);
  enriched  each chunk after the prefix then its nearest neighbour: the passage of the whole dev corpus
            (all 50 questions' passages) closest to it by the store's embedder, itself excluded. The
            neighbour's rows are dropped; the chunk's keys are re-rotated to its place in the prompt.
Each way with no attention scale, the model's calibrated per-layer table and a few uniform S. The
first chunk is exact where it sits in both (it follows the prefix), so only chunks 2..k differ.
Choose among the variants on the fit half (0-24) and read the held-out half (25-49).

With `--modes` (bench.run's mode names), the same enriched entries go through the real pipeline instead:
each mode runs teacher-forced as `bench.run --forced-only` runs it, with the store's entries for chunks
2..k swapped for the enriched ones as they are placed (so blend's selection and recompute see them):

    python -m bench.enriched --questions 0-24 --modes blend-0.15-probe,blend-0.15-probe-s0.85

This is a benchmark: nothing of it runs in a query.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from bench.calibrate import evaluate, load_sample, parse_range
from bench.data import DEFAULT_DATA, load_questions
from bench.reference import CACHE_ROOT, ensure_references, open_bench_pipeline
from bench.run import parse_mode, run_mode
from chunkcache.prompt import chunk_token_ids

RESULTS_DIR = Path(__file__).parent / "results" / "fidelity"
UNIFORM_S = (0.35, 0.5, 0.7, 0.85)


def ranked_neighbours(pipe, texts: list[str]) -> list[list[int]]:
    """For each text, the indices of the other texts from most to least similar (cosine of the store's
    embeddings); a text never neighbours itself (nor a copy of itself)."""
    emb = torch.nn.functional.normalize(torch.as_tensor(pipe.embed(texts)).float(), dim=-1)
    sim = emb @ emb.T
    same = torch.tensor([[a == b for b in texts] for a in texts])
    order = sim.masked_fill(same, -2.0).argsort(dim=1, descending=True)
    return [[j for j in row if texts[j] != texts[i]] for i, row in enumerate(order.tolist())]


def neighbours(pipe, texts: list[str]) -> list[int]:
    """For each text, the index of the most similar other text."""
    return [ranked[0] for ranked in ranked_neighbours(pipe, texts)]


@torch.inference_mode()
def enriched_entry(pipe, prefix_ids: list[int], neighbour_ids: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    """The chunk's KV computed after [prefix, neighbour], as a store entry would hold it: [2, layers, kv_heads,
    n, D] in the store's dtype, keys re-rotated to the positions right after the prefix (where a plain entry
    was computed), so the pipeline places it like any other (what ingest stores: chunkcache/context.py)."""
    from chunkcache.kvcompute import context_chunk_kv, prefix_cache

    lm = pipe.rt.lm
    scratch = prefix_cache(lm, prefix_ids, len(prefix_ids) + len(neighbour_ids) + len(chunk_ids))
    return context_chunk_kv(lm, scratch, len(prefix_ids), neighbour_ids.tolist(), chunk_ids.tolist(), pipe.rt.kv_dtype)


def enriched_entries(pipe, q, neighbour_of: dict[str, str]) -> tuple[dict[int, torch.Tensor], object, torch.Tensor]:
    """{prompt position of chunk i: its enriched entry} for chunks 2..k of q's prompt (the first follows the
    prefix where it sits: its plain entry is exact), with the prompt's layout and token ids."""
    req = pipe._request(q.question, None, list(q.documents), "reuse", None, 1, 0.0, 1.0, 0, None, None)
    staged = pipe._plan(req)
    layout, ids = staged.layout, staged.prompt_ids
    if len(layout.chunk_starts) != len(q.documents):
        raise SystemExit(f"{q.id}: a passage spans several chunks; this benchmark expects one chunk each")
    prefix = ids[:layout.chunk_starts[0]].tolist()
    entries = {}
    for start, n, text in list(zip(layout.chunk_starts, layout.chunk_lens, q.documents))[1:]:
        # tokenized as a chunk sits in a prompt (its text and the separator), so the chunk follows it as it
        # would follow any chunk
        neighbour = torch.tensor(chunk_token_ids(pipe.rt.lm.tokenizer, neighbour_of[text]), dtype=torch.long)
        entries[start] = enriched_entry(pipe, prefix, neighbour, ids[start:start + n])
    return entries, layout, ids


def enriched_context(pipe, sample, entries: dict[int, torch.Tensor], prefix_len: int):
    """The reuse sample with its chunks 2..k taken from `entries`, placed where they sit."""
    from chunkcache.rope import rerotate_layers

    k, v = sample.ctx_k.clone(), sample.ctx_v.clone()
    for start, entry in entries.items():
        n, entry = entry.shape[3], entry.to(k.device, torch.float32)
        rerotate_layers(entry[0], torch.full((n,), start - prefix_len, device=k.device), pipe.rt.lm.ropes,
                        out=k[:, :, start:start + n])
        v[:, :, start:start + n] = entry[1]
    sample.ctx_k, sample.ctx_v = k, v
    return sample


@contextlib.contextmanager
def placing(pipe, entries: dict[int, torch.Tensor]):
    """Within: `pipe` places `entries` (by prompt position) instead of what its store read returned."""
    place = pipe._place

    def enriched_place(entry, start, layout, cache):
        swapped = entries.get(start, entry)
        if swapped.shape[3] != entry.shape[3]:
            raise AssertionError(f"the enriched entry at {start} has {swapped.shape[3]} rows, "
                                 f"the chunk {entry.shape[3]}")
        return place(swapped, start, layout, cache)

    with mock.patch.object(pipe, "_place", enriched_place):
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.enriched", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", default="0-49")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default="",
                   help="pipeline modes (bench.run's names) to run over the enriched entries, teacher-forced, "
                        "instead of the offline reuse forward (e.g. blend-0.15-probe,blend-0.15-probe-s0.85)")
    p.add_argument("--outside-prompt", action="store_true",
                   help="take each chunk's neighbour from passages outside its prompt (an ablation)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    specs = [parse_mode(name) for name in a.modes.split(",") if name]
    ids = parse_range(a.questions)
    corpus_questions = load_questions(a.data)
    questions = [corpus_questions[i] for i in ids]
    # The store's plain entries are the base this what-if enriches itself.
    pipe = open_bench_pipeline("default", a.threads, questions=questions, data=a.data, chunk_context="none")
    lm = pipe.rt.lm
    if not pipe.rt.kv_dtype.is_floating_point:
        raise SystemExit("bench.enriched rounds entries to a float store dtype; use a float16 or float32 store")
    from chunkcache.calibration import load_chunk_log_scale

    scales = {"off": None, "table": load_chunk_log_scale(lm.calibration_id, lm.num_layers, lm.num_q_heads)}
    scales |= {f"S={s}": torch.full((lm.num_layers, 1), math.log(s)) for s in UNIFORM_S}
    passages = sorted({text for q in corpus_questions for text in q.documents})
    ranked = dict(zip(passages, ranked_neighbours(pipe, passages)))
    rows: list[dict] = []
    started = time.perf_counter()
    try:
        for number, q in zip(ids, questions):
            ref = ensure_references(pipe, [q], CACHE_ROOT / lm.fingerprint[:16])[0]
            # The ablation: neighbours from outside this prompt only, as in a corpus too large for a
            # chunk's nearest passages to be retrieved beside it.
            outside = set(q.documents) if a.outside_prompt else set()
            neighbour_of = {text: next(passages[j] for j in ranked[text] if passages[j] not in outside)
                            for text in q.documents}
            entries, layout, _ = enriched_entries(pipe, q, neighbour_of)
            # how often the neighbour is a passage of this same prompt (then the entry has seen real context)
            row = {"question": number, "id": q.id,
                   "neighbours_in_prompt": sum(neighbour_of[t] in q.documents for t in q.documents[1:])}
            if not a.modes:
                ways = {"base": load_sample(pipe, q, ref),
                        "enriched": enriched_context(pipe, load_sample(pipe, q, ref), entries, layout.chunk_starts[0])}
                for way, sample in ways.items():
                    for name, log_scale in scales.items():
                        r = evaluate(lm, [sample], log_scale)
                        row[f"{way} {name}"] = {"kl": r["kl_mean"], "top1": r["top1"]}
            with placing(pipe, entries):
                for spec in specs:
                    got = run_mode(pipe, q, spec, list(ref["forced_ids"]), ref["reference"], ref["full_answer"],
                                   len(ref["forced_ids"]), free_running=False)
                    row[f"enriched {spec.name}"] = {"kl": got["kl_mean"], "top1": got["top1"]}
            rows.append(row)
            print(number, " ".join(f"{k}: {v['kl']:.4f}" for k, v in row.items() if isinstance(v, dict)),
                  file=sys.stderr, flush=True)
    finally:
        pipe.close()
    report = summarize(rows, ids)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    tags = ("-modes" if specs else "") + ("-outside" if a.outside_prompt else "")
    stem = a.out_dir / f"{dt.date.today().isoformat()}-musique_dev-enriched-q{a.questions}{tags}"
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": report,
                                                     "seconds": time.perf_counter() - started}, indent=1) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {stem}.json, .md")
    return 0


def summarize(rows: list[dict], ids: range) -> dict:
    """Mean KL and top-1 per variant on the fit half (< 25), the held-out half (>= 25) and all."""
    halves = {"fit 0-24": [r for r in rows if r["question"] < 25],
              "held out 25-49": [r for r in rows if r["question"] >= 25], "all": rows}
    variants = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    return {half: {v: {"kl": sum(r[v]["kl"] for r in rs) / len(rs), "top1": sum(r[v]["top1"] for r in rs) / len(rs),
                       "n": len(rs)} for v in variants}
            | {"neighbours_in_prompt": sum(r["neighbours_in_prompt"] for r in rs) / len(rs)}
            for half, rs in halves.items() if rs}


def markdown(report: dict) -> str:
    halves = list(report)
    lines = ["| reuse variant | " + " | ".join(f"{h}: KL / top-1" for h in halves) + " |",
             "|---|" + "--:|" * len(halves)]
    for v in [v for v in report[halves[0]] if v != "neighbours_in_prompt"]:
        lines.append(f"| {v} | " + " | ".join(f"{report[h][v]['kl']:.4f} / {report[h][v]['top1']:.3f}"
                                               for h in halves) + " |")
    lines.append("")
    lines.append("Chunks 2..k whose neighbour is a passage of the same prompt, per question: " +
                 ", ".join(f"{h} {report[h]['neighbours_in_prompt']:.1f}" for h in halves))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
