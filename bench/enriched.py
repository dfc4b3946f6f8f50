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
This is a benchmark: nothing of it runs in a query.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench.calibrate import evaluate, load_sample, parse_range
from bench.data import DEFAULT_DATA, load_questions
from bench.reference import CACHE_ROOT, ensure_references, open_bench_pipeline

RESULTS_DIR = Path(__file__).parent / "results" / "fidelity"
UNIFORM_S = (0.35, 0.5, 0.7, 0.85)


def neighbours(pipe, texts: list[str]) -> list[int]:
    """For each text, the index of the most similar other text (cosine of the store's embeddings)."""
    emb = torch.nn.functional.normalize(torch.as_tensor(pipe.embed(texts)).float(), dim=-1)
    sim = emb @ emb.T
    same = torch.tensor([[a == b for b in texts] for a in texts])
    return sim.masked_fill(same, -2.0).argmax(dim=1).tolist()


@torch.inference_mode()
def enriched_context(pipe, sample, prompt_ids: torch.Tensor, layout, neighbour_ids: list[torch.Tensor]):
    """The sample with chunks 2..k recomputed after [prefix, neighbour_ids[i]] and placed where they sit."""
    from chunkcache.forward import forward_tokens
    from chunkcache.kvcompute import prefix_cache
    from chunkcache.rope import rerotate_layers

    lm = pipe.rt.lm
    starts, lens = layout.chunk_starts, layout.chunk_lens
    p = starts[0]
    k, v = sample.ctx_k.clone(), sample.ctx_v.clone()
    for i in range(1, len(starts)):
        nb, chunk = neighbour_ids[i], prompt_ids[starts[i]:starts[i] + lens[i]]
        m, n = len(nb), lens[i]
        scratch = prefix_cache(lm, prompt_ids[:p].tolist(), p + m + n)
        forward_tokens(lm, scratch, torch.cat((nb, chunk)), torch.arange(p, p + m + n))
        rows = slice(p + m, p + m + n)
        store_dtype = pipe.rt.kv_dtype  # rounded as a store entry would be
        rerotate_layers(scratch.k[:, :, rows].to(store_dtype).float(), torch.full((n,), starts[i] - (p + m)),
                        lm.ropes, out=k[:, :, starts[i]:starts[i] + n])
        v[:, :, starts[i]:starts[i] + n] = scratch.v[:, :, rows].to(store_dtype).float()
    sample.ctx_k, sample.ctx_v = k, v
    return sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.enriched", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", default="0-49")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    ids = parse_range(a.questions)
    corpus_questions = load_questions(a.data)
    questions = [corpus_questions[i] for i in ids]
    pipe = open_bench_pipeline("default", a.threads, questions=questions, data=a.data)
    lm = pipe.rt.lm
    from chunkcache.calibration import load_chunk_log_scale

    scales = {"off": None, "table": load_chunk_log_scale(lm.calibration_id, lm.num_layers, lm.num_q_heads)}
    scales |= {f"S={s}": torch.full((lm.num_layers, 1), math.log(s)) for s in UNIFORM_S}
    passages = sorted({text for q in corpus_questions for text in q.documents})
    nearest = neighbours(pipe, passages)
    neighbour_of = {text: passages[j] for text, j in zip(passages, nearest)}
    rows: list[dict] = []
    started = time.perf_counter()
    try:
        for number, q in zip(ids, questions):
            ref = ensure_references(pipe, [q], CACHE_ROOT / lm.fingerprint[:16])[0]
            req = pipe._request(q.question, None, list(q.documents), "reuse", None, 1, 0.0, 1.0, 0, None, None)
            prep = pipe._prepare(req)
            if len(prep.layout.chunk_starts) != len(q.documents):
                raise SystemExit(f"{q.id}: a passage spans several chunks; this benchmark expects one chunk each")
            nb_ids = [torch.tensor(pipe.tokenize(neighbour_of[text]), dtype=torch.long)
                      for text in q.documents]
            ways = {"base": load_sample(pipe, q, ref),
                    "enriched": enriched_context(pipe, load_sample(pipe, q, ref), prep.prompt_ids, prep.layout, nb_ids)}
            row = {"question": number, "id": q.id}
            for way, sample in ways.items():
                for name, log_scale in scales.items():
                    r = evaluate(lm, [sample], log_scale)
                    row[f"{way} {name}"] = {"kl": r["kl_mean"], "top1": r["top1"]}
            rows.append(row)
            print(number, " ".join(f"{k}: {v['kl']:.4f}" for k, v in row.items() if isinstance(v, dict)),
                  file=sys.stderr, flush=True)
    finally:
        pipe.close()
    report = summarize(rows, ids)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.out_dir / f"{dt.date.today().isoformat()}-musique_dev-enriched-q{a.questions}"
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": report,
                                                     "seconds": time.perf_counter() - started}, indent=1) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {stem}.json, .md")
    return 0


def summarize(rows: list[dict], ids: range) -> dict:
    """Mean KL and top-1 per variant on the fit half (< 25), the held-out half (>= 25) and all."""
    halves = {"fit 0-24": [r for r in rows if r["question"] < 25], "held out 25-49": [r for r in rows if r["question"] >= 25],
              "all": rows}
    variants = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    return {half: {v: {"kl": sum(r[v]["kl"] for r in rs) / len(rs), "top1": sum(r[v]["top1"] for r in rs) / len(rs),
                       "n": len(rs)} for v in variants} for half, rs in halves.items() if rs}


def markdown(report: dict) -> str:
    halves = list(report)
    lines = ["| reuse variant | " + " | ".join(f"{h}: KL / top-1" for h in halves) + " |",
             "|---|" + "--:|" * len(halves)]
    for v in report[halves[0]]:
        lines.append(f"| {v} | " + " | ".join(f"{report[h][v]['kl']:.4f} / {report[h][v]['top1']:.3f}"
                                               for h in halves) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
