"""HTTP overhead benchmark: TTFT through POST /query vs RAGPipeline directly, and throughput under load.

One process, one pipeline: the server (uvicorn on 127.0.0.1, a free port) and the direct calls share the
same model and store, measured in the same run.

TTFT, both sides measured by the caller, from sending to the first text piece: direct =
`pipe.events(...)` until the first string; HTTP = POST /query with stream=true until the first
`token` event (a new connection per request, as a simple client does). The two alternate per question
so drift hits both. The pipeline's own `ttft_s` (retrieval, KV load, prefill) is reported beside them.

Direct calls run in a worker thread, as the server's do, so both sides see the same threading.
On a shared machine, run it more than once: other processes' bursts on the same cores can make
single calls 10x slower (seen on a 2-core box with load average 4), and --duration 10 sees few requests.

Throughput: --clients threads, each with a keep-alive httpx client, send non-streamed /query requests
back to back for --duration seconds (questions round-robin); then, unless --no-baseline, one thread
calls `pipe.query` back to back for as long. The model runs one request at a time, so the
concurrent HTTP load should match the direct baseline; the difference is the HTTP layer's cost.

With the default model on a small store built from the bundled demo corpus when empty:

    python -m bench.http                              # 4 clients for 60 s
    python -m bench.http --duration 10 --queries 3    # quick check

Results go to bench/results/http-<date>.json and are printed as a markdown table with the configuration.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
QUESTION_TOPICS = ("with", "for", "while", "try", "class", "import", "lambda", "yield", "global", "raise",
                   "assert", "return")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p)
    p.add_argument("--queries", type=int, default=6, help="distinct questions for the TTFT comparison")
    p.add_argument("--repeats", type=int, default=2, help="TTFT measurements per question and side")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients for the throughput run")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (and of the direct baseline)")
    p.add_argument("--no-baseline", action="store_true", help="skip the direct sequential throughput baseline")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/http-<date>.json)")
    return p.parse_args(argv)


def workload_args(p: argparse.ArgumentParser) -> None:
    """The flags the HTTP benchmarks share: store, model, threads and the request shape."""
    p.add_argument("--store", default="stores/bench-http", help="store (built from the demo corpus if empty)")
    p.add_argument("--model", default=None, help="LLM (default: the store's, else the default model)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--mode", default="blend", choices=("full", "reuse", "blend", "epic"))
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32, help="per request")


def questions(n: int) -> list[str]:
    from chunkcache.demo_corpus import DEMO_QUESTIONS

    extra = [f"What does the {t} statement do in Python?" for t in QUESTION_TOPICS]
    return (list(DEMO_QUESTIONS) + extra)[:max(1, n)]


def open_pipeline(args: argparse.Namespace):
    from chunkcache import RAGPipeline
    from chunkcache.config import cache_home
    from chunkcache.demo_corpus import write_demo_corpus
    from chunkcache.openmp import in_passing_thread

    overrides = {k: v for k, v in (("model", args.model), ("device", args.device), ("threads", args.threads))
                 if v is not None}
    pipe = RAGPipeline.open(args.store, **overrides)
    if pipe.rt.store.index().ntotal == 0:
        corpus = write_demo_corpus(cache_home() / "demo_corpus")
        print(f"building {args.store} from the demo corpus {corpus} ...", file=sys.stderr)
        # On a passing thread: the main thread keeps no OpenMP team beside the engines' (chunkcache/openmp.py).
        print(in_passing_thread(lambda: pipe.ingest([corpus])).summary(), file=sys.stderr)
    return pipe


class LoopbackServer:
    """uvicorn serving `app` in a thread on a free 127.0.0.1 port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def stop_engines_but(pipes: dict, keep) -> None:
    """Stop the engine of every pipeline in `pipes` but `keep`'s: each engine thread keeps an OpenMP team while it
    lives, and two teams on these cores throttle each other (chunkcache/openmp.py; it slowed decode ~1.4x)."""
    for name, pipe in pipes.items():
        if name != keep:
            pipe.stop_engine()


def in_worker(fn, *args):
    """fn(*args) in a worker thread (see the module docstring), waiting for it."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def ttft_direct(pipe, question: str, kwargs: dict) -> tuple[float, float]:
    """(caller-side seconds to the first text piece, the pipeline's ttft_s); call it in_worker."""
    started = time.perf_counter()
    first = None
    for event in pipe.events(question, **kwargs):
        if first is None:
            first = time.perf_counter() - started
        if not isinstance(event, str):
            return first, event.ttft_s
    raise AssertionError("events() ended without an Answer")


def ttft_http(url: str, question: str, kwargs: dict) -> tuple[float, float]:
    import httpx

    with httpx.Client(base_url=url, timeout=600) as http:
        first, _, answer = query_stream(http, {"question": question, **kwargs})
    return first, answer["ttft_s"]


def query_stream(http, payload: dict) -> tuple[float, float, dict]:
    """POST /query with stream=true on an httpx client -> (seconds to the first `token` event, seconds to the
    `answer` event, the answer)."""
    started = time.perf_counter()
    first = None
    event = None
    with http.stream("POST", "/query", json={**payload, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
                if first is None and event in ("token", "answer"):
                    first = time.perf_counter() - started
            elif line.startswith("data: ") and event == "answer":
                return first, time.perf_counter() - started, json.loads(line[len("data: "):])
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(line)
    raise RuntimeError("the stream ended without an answer event")


def run_ttft(pipe, url: str, args: argparse.Namespace) -> dict:
    kwargs = {"mode": args.mode, "top_k": args.top_k, "max_new_tokens": 1}
    rows = {"direct": [], "http": [], "direct_pipeline": [], "http_pipeline": []}
    for question in questions(args.queries):
        for rep in range(args.repeats):
            sides = ("direct", "http") if rep % 2 == 0 else ("http", "direct")
            for side in sides:
                caller, pipeline = (in_worker(ttft_direct, pipe, question, kwargs) if side == "direct"
                                    else ttft_http(url, question, kwargs))
                rows[side].append(caller)
                rows[f"{side}_pipeline"].append(pipeline)
    summary = {name: summarize(values) for name, values in rows.items()}
    summary["http_overhead_ms_median"] = 1000 * (summary["http"]["median"] - summary["direct"]["median"])
    return summary


def run_load(url: str, args: argparse.Namespace) -> dict:
    import httpx

    qs = questions(max(args.queries, args.clients))
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()
    deadline = time.perf_counter() + args.duration

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            i = index
            while time.perf_counter() < deadline:
                payload = {"question": qs[i % len(qs)], "mode": args.mode, "top_k": args.top_k,
                           "max_new_tokens": args.max_new_tokens}
                started = time.perf_counter()
                r = http.post("/query", json=payload)
                elapsed = time.perf_counter() - started
                with lock:
                    if r.status_code == 200:
                        latencies.append(elapsed)
                        tokens.append(r.json()["stats"]["completion_tokens"])
                    else:
                        errors.append(r.status_code)
                i += args.clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return throughput(latencies, tokens, time.perf_counter() - started, errors)


def run_baseline(pipe, args: argparse.Namespace) -> dict:
    qs = questions(max(args.queries, args.clients))
    latencies, tokens = [], []
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < args.duration:
        t = time.perf_counter()
        answer = pipe.query(qs[i % len(qs)], mode=args.mode, top_k=args.top_k, max_new_tokens=args.max_new_tokens)
        latencies.append(time.perf_counter() - t)
        tokens.append(answer.stats.completion_tokens)
        i += 1
    return throughput(latencies, tokens, time.perf_counter() - started, [])


def throughput(latencies: list[float], tokens: list[int], wall: float, errors: list[int]) -> dict:
    return {"requests": len(latencies), "errors": len(errors), "error_statuses": sorted(set(errors)),
            "wall_s": wall, "requests_per_s": len(latencies) / wall, "completion_tokens_per_s": sum(tokens) / wall,
            "latency_s": summarize(latencies)}


def summarize(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "p95": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))], "min": ordered[0],
            "max": ordered[-1]}


def configuration(pipe, args: argparse.Namespace) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    lm = pipe.rt.lm
    return dict(date=dt.datetime.now().isoformat(timespec="seconds"), commit=commit, store=str(pipe.rt.store_path),
                store_chunks=pipe.rt.store.index().ntotal, model=lm.spec, model_fingerprint=lm.fingerprint,
                kv_dtype=pipe.config.kv_dtype, chunk_tokens=pipe.config.chunk_tokens, device=str(lm.device),
                torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version(), platform=platform.platform(), mode=args.mode, top_k=args.top_k,
                recompute_ratio=pipe.config.recompute_ratio, max_new_tokens=args.max_new_tokens,
                queries=args.queries, repeats=args.repeats, clients=args.clients, duration_s=args.duration)


def markdown(config: dict, ttft: dict, load: dict, baseline: dict | None) -> str:
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    lines = ["**Configuration:** " + ", ".join(f"{k}={v}" for k, v in config.items()), "",
             "| TTFT (caller-side) | n | median ms | mean ms | p95 ms | pipeline ttft_s median ms |",
             "|---|---|---|---|---|---|"]
    for side in ("direct", "http"):
        t, p = ttft[side], ttft[f"{side}_pipeline"]
        lines.append(f"| {side} | {t['n']} | {ms(t['median'])} | {ms(t['mean'])} | {ms(t['p95'])} | {ms(p['median'])} |")
    lines += [f"\nHTTP overhead on TTFT (median): {ttft['http_overhead_ms_median']:.1f} ms", "",
              "| throughput | requests | errors | req/s | completion tok/s | latency p50 s | latency p95 s |",
              "|---|---|---|---|---|---|---|"]
    runs = [(f"HTTP /query, {config['clients']} clients", load)] + ([("direct, sequential", baseline)]
                                                                   if baseline else [])
    for name, r in runs:
        lat = r["latency_s"]
        lines.append(f"| {name} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
                     f"{r['completion_tokens_per_s']:.1f} | {lat.get('median', float('nan')):.2f} | "
                     f"{lat.get('p95', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from chunkcache.server import NoMetrics, create_app

    pipe = open_pipeline(args)
    config = configuration(pipe, args)
    for question in questions(args.queries):  # warm-up: kernels, caches, every question's chunks
        in_worker(lambda q: pipe.query(q, mode=args.mode, top_k=args.top_k, max_new_tokens=2), question)
    with LoopbackServer(create_app(pipe, metrics=NoMetrics())) as url:
        ttft_http(url, questions(1)[0], {"mode": args.mode, "top_k": args.top_k, "max_new_tokens": 1})
        print("TTFT: direct vs HTTP ...", file=sys.stderr)
        ttft = run_ttft(pipe, url, args)
        print(f"load: {args.clients} clients for {args.duration:.0f} s ...", file=sys.stderr)
        load = run_load(url, args)
    baseline = None
    if not args.no_baseline:
        print(f"baseline: direct sequential for {args.duration:.0f} s ...", file=sys.stderr)
        baseline = in_worker(run_baseline, pipe, args)
    pipe.close()
    out = args.out or RESULTS_DIR / f"http-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=config, ttft=ttft, load=load, baseline=baseline), indent=2) + "\n")
    print(markdown(config, ttft, load, baseline))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
