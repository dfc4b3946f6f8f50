"""Fault figures for the store: random byte flips in data.mdb, and kill -9 during ingest.

    python -m bench.faults flips --trials 100        # flip one random byte of a copy of data.mdb, 100 times
    python -m bench.faults kills --trials 20         # kill -9 an ingest at a random moment, then resume, 20 times
    python -m bench.faults query-kills --trials 10   # kill -9 a process answering `documents` queries, 10 times
    python -m bench.faults all                       # all three; results to bench/results/faults-<command>-<date>.json

Byte flips: a store of random-valued chunks (KV, metadata, embedding) is written once; each trial copies it,
XORs one byte at a uniformly random offset of data.mdb with a random non-zero mask, then a worker process
opens the copy and reads every chunk back (checksums on). Each trial is "harmless" (every value reads back
unchanged), "detected" (the open is refused, or the damaged values raise an error or read as missing: a miss
that is recomputed), "silent" (a value changed without an error: a failure) or "signal" (the worker died
on a signal: a failure). Workers run many trials each; one killed by a signal is replaced.

kill -9: a worker ingests a small corpus with a tiny random-init model (the tests' fixture: ingest speed is
what matters here, not answers); the parent kills it with SIGKILL at a random moment, checks the store
(every checksum, no id naming a chunk twice, no chunk without its id), then resumes the ingest to the end and
checks that it completed: every source recorded complete, the retrievable chunks exactly those of the
current files, the index consistent. Between trials half the files are edited, so retirement is interrupted
too.

kill -9 mid-query: a worker answers queries whose `documents` are new text (each a KV write, with evictions
under a 2 MB cap), as `serve` does for its clients (the HTTP layer writes nothing itself); it is killed at a
random moment and the store must open clean (checksums, ids) and stay under its cap.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
TRIAL_TIMEOUT_S = 60.0

# ---- byte flips ------------------------------------------------------------------------------------------


def build_flip_store(path: Path, num_chunks: int = 24, seed: int = 0) -> dict:
    """A store of random chunks shaped like the tests' tiny model; returns what each chunk must read back."""
    import numpy as np
    import torch

    from store import KVStore, chunk_key

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    expected = {}
    items = []
    for i in range(num_chunks):
        tokens = int(rng.integers(16, 64))
        key = chunk_key("faults", [1, 2, 3], list(range(i, i + tokens)), kv_dtype="float16")
        kv = torch.randn(2, 4, 2, tokens, 16, generator=gen).to(torch.float16)
        emb = rng.standard_normal(64).astype(np.float32)
        emb /= np.linalg.norm(emb)
        meta = {"source": f"doc{i}.txt", "text": f"chunk {i} " * tokens, "token_ids": list(range(i, i + tokens)),
                "num_tokens": tokens}
        items.append((key, kv, meta, emb))
        expected[key.hex()] = {"kv": hashlib.sha256(kv.numpy().tobytes()).hexdigest(), "meta": meta,
                               "emb": hashlib.sha256(emb.tobytes()).hexdigest()}
    with KVStore(path) as store:
        for start in range(0, num_chunks, 4):  # several transactions, so old pages and free lists exist
            ids = store.put_chunks(items[start:start + 4])
            for key, chunk_id in ids.items():
                expected[key.hex()]["meta"] = {**expected[key.hex()]["meta"], "id": chunk_id}
    return expected


def check_store(path: Path, expected: dict) -> tuple[str, dict]:
    """Read every chunk of the store at `path` back; returns (outcome, counts per entry result)."""
    import lmdb
    import numpy as np

    from store import CorruptEntryError, KVStore, StoreError

    counts: Counter = Counter()
    try:
        store = KVStore(path, readonly=True)
    except (StoreError, lmdb.Error) as exc:
        return "detected", {f"open refused ({type(exc).__name__})": 1}
    try:
        for key_hex, want in expected.items():
            key = bytes.fromhex(key_hex)
            for what in ("meta", "kv", "emb"):
                try:
                    if what == "meta":
                        got = store.get_meta(key)
                        same = got == want["meta"]
                    elif what == "kv":
                        with store.reader() as r:
                            kv = r.kv(key)
                            got = None if kv is None else hashlib.sha256(kv.numpy().tobytes()).hexdigest()
                        same = got == want["kv"]
                    else:
                        emb = store.embedding(key)
                        got = None if emb is None else hashlib.sha256(np.asarray(emb).tobytes()).hexdigest()
                        same = got == want["emb"]
                except (CorruptEntryError, StoreError, lmdb.Error) as exc:
                    counts[f"{what} detected ({type(exc).__name__})"] += 1
                    continue
                counts[f"{what} ok" if same else (f"{what} missing" if got is None else f"{what} SILENT")] += 1
        try:
            ids, _vecs = store.embeddings()
            for key in store.key_for_id(ids):
                if key is None or key.hex() not in expected:
                    counts["ids table detected (unknown key)"] += 1
        except (CorruptEntryError, StoreError, lmdb.Error) as exc:
            counts[f"ids table detected ({type(exc).__name__})"] += 1
    finally:
        store.close()
    if any("SILENT" in k for k in counts):
        return "silent", dict(counts)
    if any(not k.endswith(" ok") for k in counts):
        return "detected", dict(counts)
    return "harmless", dict(counts)


def flip_worker(args) -> int:
    """Run trials args.start.. of the flip series, one JSON line each (the parent reads them as they come)."""
    pristine = Path(args.pristine)
    expected = json.loads((pristine / "expected.json").read_text())
    size = (pristine / "kv.lmdb" / "data.mdb").stat().st_size
    for trial in range(args.start, args.trials):
        rng = random.Random(args.seed * 1_000_003 + trial)
        offset, mask = rng.randrange(size), rng.randrange(1, 256)
        work = Path(tempfile.mkdtemp(prefix=f"flip{trial}-", dir=args.scratch))
        shutil.copytree(pristine / "kv.lmdb", work / "kv.lmdb")
        data = work / "kv.lmdb" / "data.mdb"
        with open(data, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ mask]))
        print(json.dumps({"trial": trial, "offset": offset, "mask": mask, "state": "started"}), flush=True)
        outcome, counts = check_store(work, expected)
        print(json.dumps({"trial": trial, "offset": offset, "mask": mask, "outcome": outcome, "counts": counts}),
              flush=True)
        shutil.rmtree(work)
    return 0


def run_flips(trials: int, seed: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="chunkcache-flips-"))
    try:
        pristine = scratch / "pristine"
        expected = build_flip_store(pristine, seed=seed)
        (pristine / "expected.json").write_text(json.dumps(expected))
        size = (pristine / "kv.lmdb" / "data.mdb").stat().st_size
        started = time.perf_counter()
        results, next_trial = [], 0
        while next_trial < trials:
            cmd = [sys.executable, "-m", "bench.faults", "flip-worker", "--pristine", str(pristine), "--scratch",
                   str(scratch), "--trials", str(trials), "--start", str(next_trial), "--seed", str(seed)]
            lines, rc = _stream(cmd, TRIAL_TIMEOUT_S)
            current = None
            for line in lines:
                if line.get("state") == "started":
                    current = line
                else:
                    results.append(line)
                    current = None
            if current is not None:  # died or hung inside this trial
                why = f"signal {-rc}" if rc is not None and rc < 0 else ("hang" if rc is None else f"exit {rc}")
                results.append({**current, "outcome": "signal" if rc is not None and rc < 0 else why})
                current.pop("state")
            next_trial = len(results)
            if rc not in (0, None) and current is None and next_trial < trials:
                raise RuntimeError(f"flip worker failed outside a trial (exit {rc})")
        outcomes = Counter(r["outcome"] for r in results)
        return {"trials": trials, "seed": seed, "data_mdb_bytes": size, "chunks": len(expected),
                "outcomes": dict(outcomes), "failures": [r for r in results if r["outcome"] not in
                                                          ("harmless", "detected")],
                "entry_results": dict(sum((Counter(r.get("counts", {})) for r in results), Counter())),
                "seconds": round(time.perf_counter() - started, 1)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _stream(cmd: list[str], timeout_s: float) -> tuple[list[dict], int | None]:
    """Run cmd, collecting its JSON lines; kill it if no line comes for timeout_s (returns rc None then)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
    lines = []
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            proc.kill()
            proc.wait()
            return lines, None
        line = proc.stdout.readline()
        if not line:
            return lines, proc.wait()
        lines.append(json.loads(line))


# ---- kill -9 during ingest ------------------------------------------------------------------------------

TOPICS = ["rivers", "mountains", "deserts", "forests", "oceans", "glaciers", "volcanoes", "islands"]


def write_corpus(root: Path, rng: random.Random) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for t, topic in enumerate(TOPICS):
        sentences = [f"Fact {s} about {topic}: the number {rng.randrange(10**6)} matters for {topic} number {t}."
                     for s in range(40)]
        (root / f"{topic}.txt").write_text(" ".join(sentences))


def _tiny_pipeline(store: str, **overrides):
    """A RAGPipeline over `store` with the tests' tiny random-init model and hashing embedder."""
    import torch

    # NOTE: the fixture's model lives with the tests; a fault run needs a fast model, not a good one.
    sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import make_tiny_lm
    from transformers import AutoTokenizer

    from chunkcache import RAGPipeline
    from chunkcache.models import default_gguf_path
    from retriever.hashing import HashingEmbedder

    torch.set_num_threads(1)
    gguf = default_gguf_path()
    lm = make_tiny_lm(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    return RAGPipeline.open(store, lm=lm, embedder=HashingEmbedder(), kv_dtype="float16", chunk_tokens=48,
                            **overrides)


def documents_worker(args) -> int:
    """Answer queries with new `documents` (each a miss: a KV write, and evictions under the cap) forever,
    as a server does for its clients, until killed."""
    pipe = _tiny_pipeline(args.store, max_store_bytes=args.cap)
    print("ready", flush=True)
    rng = random.Random(os.getpid())
    while True:
        docs = [f"Note {rng.randrange(10**9)}: " + " ".join(rng.choice(TOPICS) for _ in range(60)) for _ in range(4)]
        pipe.query("Which topics come up?", documents=docs, mode="reuse", max_new_tokens=1)


def ingest_worker(args) -> int:
    """Ingest args.corpus into args.store with the tiny random-init model of the tests."""
    pipe = _tiny_pipeline(args.store)
    print("ready", flush=True)
    report = pipe.ingest([args.corpus], progress=False)
    pipe.close()
    print(json.dumps({"chunks": report.chunks, "computed": report.chunks_computed,
                      "retired": report.chunks_retired, "seconds": report.seconds_total}), flush=True)
    return 0


def check_ingested(store_dir: Path, complete: bool) -> dict:
    """Consistency of a store after a kill (and, with complete, after a finished ingest)."""
    from chunkcache.storedir import ChunkStore

    store = ChunkStore(store_dir)
    try:
        found = store.kv.scan()
        with store.kv._read_txn() as txn:  # the tables, raw: every id names a distinct chunk, every chunk an id
            id_keys = [bytes(k) for _, k in txn.cursor(db=store.kv._dbs["ids"])]
            meta_keys = [bytes(k) for k, _ in txn.cursor(db=store.kv._dbs["meta"])]
        out = {"damaged": sum(len(found[k]) for k in ("kv", "meta", "emb")), "orphan_ids": len(found["orphan_ids"]),
               "duplicate_ids": len(id_keys) - len(set(id_keys)),
               "chunks_without_id": len(set(meta_keys) - set(id_keys))}
        if complete:
            records = store.kv.sources()
            held = {k for r in records.values() for k in r.get("keys", [])}
            ids, _ = store.kv.embeddings()
            retrievable = {k.hex() for k in store.kv.key_for_id(ids)}
            out["incomplete_sources"] = sum(not r.get("complete") or bool(r.get("stale")) for r in records.values())
            out["retrievable_not_held"] = len(retrievable - held)
            out["held_not_retrievable"] = len(held - retrievable)
            out["index_matches"] = store.index().ntotal == store.kv.num_embeddings() == len(retrievable)
        return out
    finally:
        store.close()


def run_kills(trials: int, seed: int) -> dict:
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="chunkcache-kills-"))
    try:
        corpus, store_dir = scratch / "corpus", scratch / "store"
        write_corpus(corpus, rng)
        started = time.perf_counter()
        full = _ingest(store_dir, corpus, kill_after=None)  # the first full run sets the kill window
        window = full["report"]["seconds"]
        shutil.rmtree(store_dir)
        trials_out = []
        for trial in range(trials):
            if trial:  # prepend to half the files: each run recomputes half the chunks and retires the old ones
                for topic in rng.sample(TOPICS, len(TOPICS) // 2):
                    path = corpus / f"{topic}.txt"
                    path.write_text(f"Edit {trial}: the number {rng.randrange(10**6)} is new. " + path.read_text())
            kill_at = rng.uniform(0.0, window if not trial else window / 2)
            killed = _ingest(store_dir, corpus, kill_after=kill_at)
            after_kill = check_ingested(store_dir, complete=False)
            resumed = _ingest(store_dir, corpus, kill_after=None)
            after_resume = check_ingested(store_dir, complete=True)
            trials_out.append({"trial": trial, "kill_at_s": round(kill_at, 2), "killed": killed["killed"],
                               "after_kill": after_kill, "resume_rc": resumed["rc"],
                               "resume": resumed.get("report"), "after_resume": after_resume})
        bad = [t for t in trials_out if t["resume_rc"] != 0 or t["after_kill"]["damaged"]
               or t["after_kill"]["duplicate_ids"] or t["after_kill"]["chunks_without_id"] or t["after_resume"]["incomplete_sources"]
               or t["after_resume"]["retrievable_not_held"] or t["after_resume"]["held_not_retrievable"]
               or not t["after_resume"]["index_matches"] or t["after_resume"]["damaged"]]
        return {"trials": trials, "seed": seed, "full_ingest_s": round(window, 2), "files": len(TOPICS),
                "killed_mid_ingest": sum(t["killed"] for t in trials_out),
                "resumes_with_work_left": sum(bool(t["resume"] and (t["resume"]["computed"] or t["resume"]["retired"]))
                                              for t in trials_out),
                "corrupt_after_kill": sum(t["after_kill"]["damaged"] for t in trials_out),
                "duplicate_ids": sum(t["after_kill"]["duplicate_ids"] for t in trials_out),
                "resumes_complete": sum(t["resume_rc"] == 0 for t in trials_out) - len(bad) + sum(
                    t["resume_rc"] != 0 for t in bad),
                "failures": bad, "trial_details": trials_out, "seconds": round(time.perf_counter() - started, 1)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_query_kills(trials: int, seed: int, cap: int = 2_000_000) -> dict:
    """kill -9 a process answering `documents` queries (KV writes and evictions) mid-write, `trials` times;
    after each, the store must open clean. The HTTP layer adds no writes, so this is `serve`'s store path."""
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="chunkcache-qkills-"))
    try:
        store_dir = scratch / "store"
        started = time.perf_counter()
        out = []
        for trial in range(trials):
            cmd = [sys.executable, "-m", "bench.faults", "documents-worker", "--store", str(store_dir),
                   "--cap", str(cap)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                    env=env)
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
            time.sleep(rng.uniform(0.2, 2.0))
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
            check = check_ingested(store_dir, complete=False)
            from store import KVStore

            with KVStore(store_dir, readonly=True) as kv:
                check["kv_bytes"] = kv.kv_bytes()
            out.append({"trial": trial, "rc": proc.returncode, **check})
        bad = [t for t in out if t["damaged"] or t["duplicate_ids"] or t["orphan_ids"] or t["chunks_without_id"]
               or t["kv_bytes"] > cap]
        return {"trials": trials, "seed": seed, "cap_bytes": cap,
                "killed": sum(t["rc"] == -signal.SIGKILL for t in out),
                "opened_clean": trials - len(bad), "max_kv_bytes_seen": max(t["kv_bytes"] for t in out),
                "failures": bad, "seconds": round(time.perf_counter() - started, 1)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _ingest(store_dir: Path, corpus: Path, kill_after: float | None) -> dict:
    """Run an ingest worker; with kill_after, SIGKILL it that many seconds after its model is loaded."""
    cmd = [sys.executable, "-m", "bench.faults", "ingest-worker", "--store", str(store_dir), "--corpus", str(corpus)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    t0 = time.perf_counter()
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    result = {"rc": proc.returncode, "killed": proc.returncode == -signal.SIGKILL,
              "ingest_s": time.perf_counter() - t0}
    if proc.returncode == 0 and out.strip():
        result["report"] = json.loads(out.strip().splitlines()[-1])
    elif not result["killed"]:
        raise RuntimeError(f"ingest worker failed (exit {proc.returncode}): {err[-2000:]}")
    return result


# ---- command line ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("flips", "kills", "query-kills", "all"):
        p = sub.add_parser(name)
        p.add_argument("--trials", type=int, default=None, help="default: 100 flips, 20 kills")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/")
    p = sub.add_parser("flip-worker")
    for flag in ("--pristine", "--scratch"):
        p.add_argument(flag, required=True)
    for flag in ("--trials", "--start", "--seed"):
        p.add_argument(flag, type=int, required=True)
    p = sub.add_parser("documents-worker")
    p.add_argument("--store", required=True)
    p.add_argument("--cap", type=int, required=True)
    p = sub.add_parser("ingest-worker")
    p.add_argument("--store", required=True)
    p.add_argument("--corpus", required=True)
    args = parser.parse_args(argv)
    if args.command == "flip-worker":
        return flip_worker(args)
    if args.command == "ingest-worker":
        return ingest_worker(args)
    if args.command == "documents-worker":
        return documents_worker(args)
    import platform

    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
              "platform": platform.platform(), "command": "python -m bench.faults " + " ".join(argv or sys.argv[1:])}
    if args.command in ("flips", "all"):
        result["flips"] = run_flips(args.trials or 100, args.seed)
        f = result["flips"]
        print(f"byte flips: {f['trials']} trials on a {f['data_mdb_bytes']} B data.mdb ({f['chunks']} chunks): "
              f"{f['outcomes']}; failures {len(f['failures'])}; {f['seconds']} s")
    if args.command in ("kills", "all"):
        result["kills"] = run_kills(args.trials or 20, args.seed)
        k = result["kills"]
        print(f"kill -9 during ingest: {k['trials']} trials ({k['killed_mid_ingest']} killed mid-run, full ingest "
              f"{k['full_ingest_s']} s, {k['resumes_with_work_left']} resumes had work left): "
              f"{k['corrupt_after_kill']} corrupt entries, {k['duplicate_ids']} duplicate "
              f"ids, {k['resumes_complete']}/{k['trials']} resumes complete; failures {len(k['failures'])}; "
              f"{k['seconds']} s")
    if args.command in ("query-kills", "all"):
        result["query_kills"] = run_query_kills(args.trials or 10, args.seed)
        q = result["query_kills"]
        print(f"kill -9 while answering `documents` queries (store cap {q['cap_bytes']} B): {q['trials']} trials, "
              f"{q['killed']} killed, {q['opened_clean']}/{q['trials']} stores opened clean, KV bytes at most "
              f"{q['max_kv_bytes_seen']}; failures {len(q['failures'])}; {q['seconds']} s")
    if not args.no_save:
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"faults-{args.command}-{dt.date.today().isoformat()}.json"
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {out}")
    failed = any(result.get(k, {}).get("failures") for k in ("flips", "kills", "query_kills"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
