"""Serving under load: continuous batching against one request at a time, side by side in one run.

One process and one model. Two servers (uvicorn on 127.0.0.1) share it: one whose engine admits
`--max-running` requests at once (the default, 8), one with max_running=1 (today's one-at-a-time
mode); `--compare-prefilling N` adds a third, like the first but with max_prefilling=N (how many
requests prefill at once; the config's default is 1 on CPU). Only the server being measured has an
engine thread running (see `warm_up`). For each client count (1, 2, 4, 8, 16 by default) and each
server, in turn, that many
clients (threads of a process of their own, each with a keep-alive httpx client) send streamed POST
/query requests back to back until each has sent `--requests` of them. A client measures TTFT at the first `token` event
and the latency at the `answer` event; completion tokens come from the answer.

Default workload: the demo store, blend at 0.15, top_k 4, 32 new tokens, the demo questions
round-robin. Run it on a quiet machine (nothing else using the cores):

    python -m bench.load --threads 2                 # the README table
    python -m bench.load --clients 1,8 --requests 3  # quick check
    python -m bench.load --threads 2 --compare-prefilling 8   # first come first served against batched prefills

Results: bench/results/load/<date>-<model>-t<threads>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.envinfo import next_free_path
from bench.http import (LoopbackServer, configuration, in_worker, open_pipeline, query_stream, questions,
                        stop_engines_but, summarize, workload_args)

RESULTS_DIR = Path(__file__).parent / "results" / "load"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(p)
    p.add_argument("--clients", default="1,2,4,8,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends at each level")
    p.add_argument("--max-running", type=int, default=8, help="the batching server's engine limit")
    p.add_argument("--max-batched-tokens", type=int, default=None,
                   help="the batching server's rows per step (default: the config's, 2048)")
    p.add_argument("--max-prefilling", type=int, default=None,
                   help="the batching server's requests prefilling at once (default: the config's; 1 on CPU)")
    p.add_argument("--compare-prefilling", type=int, default=None, metavar="N",
                   help="also serve with max_prefilling=N, side by side (e.g. 8: a wave's prefills batched)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.queries, args.repeats, args.duration = len(questions(99)), 0, 0.0  # for bench.http.configuration
    return args


def stream_query(http, payload: dict) -> tuple[float, float, int]:
    """(TTFT at the first token event, latency at the answer event, completion tokens) for one request."""
    first, latency, answer = query_stream(http, payload)
    return first, latency, answer["stats"]["completion_tokens"]


def run_level(url: str, clients: int, args: argparse.Namespace) -> dict:
    """One level, its clients in a process of their own as real clients are: as threads of the server's
    process they shared its GIL with the engine thread, which slowed an 8-request decode step by ~6%."""
    qs = questions(99)
    payloads = [[{"question": qs[(index + n * clients) % len(qs)], "mode": args.mode, "top_k": args.top_k,
                  "max_new_tokens": args.max_new_tokens} for n in range(args.requests)] for index in range(clients)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients_process:
        return clients_process.submit(_clients, url, payloads).result()


def _clients(url: str, payloads: list[list[dict]]) -> dict:
    """In the clients' process: client i sends payloads[i], back to back."""
    return closed_loop(url, len(payloads), len(payloads[0]),
                       lambda http, index, n: stream_query(http, payloads[index][n]))


def closed_loop(url: str, clients: int, requests: int, send) -> dict:
    """`clients` threads, each with its own keep-alive client, sending `requests` requests back to back:
    send(http, client index, request number) -> (TTFT, latency, completion tokens). Failures are counted."""
    import httpx

    ttfts, latencies, tokens, errors = [], [], [], []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=900) as http:
            for n in range(requests):
                try:
                    ttft, latency, completion = send(http, index, n)
                except (httpx.HTTPError, RuntimeError) as exc:
                    with lock:
                        errors.append(str(exc)[:200])
                    continue
                with lock:
                    ttfts.append(ttft)
                    latencies.append(latency)
                    tokens.append(completion)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "errors": errors, "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "completion_tokens_per_s": sum(tokens) / wall,
            "ttft_s": summarize(ttfts) | {"p90": _quantile(ttfts, 0.9)}, "latency_s": summarize(latencies)}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def warm_up(pipe, args: argparse.Namespace) -> None:
    """One short request, so that a freshly started engine has its thread, OpenMP team and KV pool before a level."""
    in_worker(lambda q: pipe.query(q, mode=args.mode, top_k=args.top_k, max_new_tokens=2), questions(99)[0])


def servers(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(name, label, config overrides) of each server the levels run against, in order."""
    prefilling = args.max_prefilling or "auto"
    named = [("batched", f"batched (max_running={args.max_running}, max_prefilling={prefilling})",
              {"max_running": args.max_running, "max_prefilling": args.max_prefilling}),
             ("one_at_a_time", "one at a time (max_running=1)", {"max_running": 1, "max_prefilling": None})]
    if args.compare_prefilling:
        named.insert(1, ("batched_prefills", f"batched (max_running={args.max_running}, "
                         f"max_prefilling={args.compare_prefilling})",
                         {"max_running": args.max_running, "max_prefilling": args.compare_prefilling}))
    return named


def markdown(config: dict, rows: dict[str, list[dict]], args: argparse.Namespace) -> str:
    lines = ["| clients | engine | req/s | completion tok/s | TTFT p50 | TTFT p90 | latency p50 | errors |",
             "|--:|---|--:|--:|--:|--:|--:|--:|"]
    named = servers(args)
    for name, label, _ in named:
        for r in rows[name]:
            lines.append(f"| {r['clients']} | {label} | {r['requests_per_s']:.2f} | {r['completion_tokens_per_s']:.1f} | "
                         f"{r['ttft_s'].get('median', float('nan')):.2f} s | {r['ttft_s']['p90']:.2f} s | "
                         f"{r['latency_s'].get('median', float('nan')):.2f} s | {len(r['errors'])} |")
    by_clients = {r["clients"]: r for r in rows["one_at_a_time"]}
    for name, label, _ in named[:-1]:
        batched = rows[name]
        alone = next((r for r in batched if r["clients"] == 1), None)
        lines += ["", f"{label}:"]
        for r in batched:
            base = by_clients.get(r["clients"])
            if base and base["completion_tokens_per_s"] > 0:
                ratio = r["completion_tokens_per_s"] / base["completion_tokens_per_s"]
                line = f"- {r['clients']} clients: completion tok/s = {ratio:.2f}x one at a time"
                if alone:  # (a run without the 1-client level has no single-client TTFT to compare with)
                    ttft_ratio = r["ttft_s"].get("median", float("nan")) / alone["ttft_s"]["median"]
                    line += f"; TTFT p50 = {ttft_ratio:.2f}x its single-client TTFT"
                lines.append(line)
    lines += ["", "**Configuration:** " + ", ".join(f"{k}={v}" for k, v in config.items())]
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, label, _ in servers(args):
        xs = [r["clients"] for r in rows[name]]
        left.plot(xs, [r["completion_tokens_per_s"] for r in rows[name]], marker="o", label=label)
        right.plot(xs, [r["ttft_s"].get("median", float("nan")) for r in rows[name]], marker="o", label=f"{label} p50")
        right.plot(xs, [r["ttft_s"]["p90"] for r in rows[name]], marker="x", linestyle="--", label=f"{label} p90")
    left.set(xlabel="concurrent clients", ylabel="completion tokens / s", xscale="log", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="TTFT (s)", xscale="log", yscale="log", title="time to first token")
    for ax in (left, right):
        ax.set_xticks(args.clients, [str(c) for c in args.clients])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from chunkcache import RAGPipeline
    from chunkcache.server import NoMetrics, create_app

    pipe = open_pipeline(args)
    pipe.rt.config = pipe.rt.config.replace(**(
        {"max_batched_tokens": args.max_batched_tokens} if args.max_batched_tokens else {}))
    # Every server shares the runtime (model, store, lock); each has its own engine and limits.
    named = servers(args)
    pipes = {name: RAGPipeline(dataclasses.replace(pipe.rt, config=pipe.rt.config.replace(**overrides)))
             for name, _, overrides in named}
    config = configuration(pipe, args) | {"clients": args.clients, "requests_per_client": args.requests,
                                          "max_running": args.max_running,
                                          "max_batched_tokens": pipe.rt.config.max_batched_tokens,
                                          "max_prefilling": pipes["batched"].engine.limits.max_prefilling,
                                          "compare_prefilling": args.compare_prefilling}
    for question in questions(99):  # warm-up: every question's chunks are in the store and the kernels are hot
        in_worker(lambda q: pipes["batched"].query(q, mode=args.mode, top_k=args.top_k, max_new_tokens=2), question)
    pipes["batched"].stop_engine()
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in named}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(LoopbackServer(create_app(pipes[name], metrics=NoMetrics())))
                for name, _, _ in named}
        for clients in args.clients:
            for name, _, _ in named:
                print(f"{clients} clients, {name} ...", file=sys.stderr)
                stop_engines_but(pipes, name)  # one engine thread at a time
                warm_up(pipes[name], args)
                rows[name].append(run_level(urls[name], clients, args))
    for served in pipes.values():
        served.engine.close()
    pipe.close()
    config["wall_min"] = round((time.perf_counter() - started) / 60, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{dt.date.today().isoformat()}-{config['model'].split('/')[-1]}-t{config['torch_threads']}.json"
    stem = next_free_path(args.out_dir / name).with_suffix("")  # never overwrite an earlier run
    Path(f"{stem}.json").write_text(json.dumps(dict(config=config, rows=rows), indent=2) + "\n")
    text = markdown(config, rows, args)
    Path(f"{stem}.md").write_text(text + "\n")
    plot(rows, Path(f"{stem}.png"), args)
    print(text)
    print(f"\nwrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
