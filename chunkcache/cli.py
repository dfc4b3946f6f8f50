"""`chunkcache` command line: ingest, query, demo, info, verify, gc, serve, bench.

The CLI only translates flags into a ChunkCacheConfig and calls the library.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from store import DamagedStoreError

from .config import (CHUNK_CONTEXTS, CHUNK_SCALES, DEVIATIONS, INDEX_KINDS, KV_DTYPES, LINEAR_DTYPES, MODES,
                     SCALE_QUERIES, SELECTIONS, ChunkCacheConfig, cache_home, check_chunk_scale)
from .config_sources import load_sources
from .corpus import SUPPORTED_SUFFIXES

DEFAULT_STORE = os.environ.get("CHUNKCACHE_STORE", "stores/default")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark has its own flags: chunkcache bench --help
        # bench/ lives beside the package in the checkout and uses it; run it as its own program so
        # that nothing in chunkcache imports it.
        import subprocess

        return subprocess.call([sys.executable, "-m", "bench.run", *argv[1:]])
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits 2 (argparse)
    level = "ERROR" if args.quiet else args.log_level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the store holds every batch written so far; re-run the same command to resume",
              file=sys.stderr)
        return 130
    except (DamagedStoreError, ValueError, RuntimeError, OSError) as exc:  # a runtime error exits 1
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="chunkcache", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"chunkcache {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only results and errors")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a TOML settings file ([pipeline] and [server] tables; default $CHUNKCACHE_CONFIG). "
                        "Precedence: flags, then CHUNKCACHE_<SETTING> variables, then the file")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="chunk, embed and precompute KV caches for files and directories",
                       description="Chunk files with the LLM's tokenizer, embed them into a Faiss index and store "
                       "each chunk's KV cache in LMDB. Re-running skips unchanged files and stored chunks; an "
                       "interrupted run resumes. Supported files: " + " ".join(SUPPORTED_SUFFIXES) + " (JSON Lines: "
                       "one document per line with a 'text' field, optional 'title'); directories are read "
                       "recursively (links followed, loops refused); files of other types are ignored; FIFOs, devices, "
                       "unreadable, too large, binary or non-UTF-8 files and bad JSONL lines are skipped, reported, "
                       "and make the exit status 1.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    _store_args(p)
    p.add_argument("--chunk-tokens", type=int, default=256, help="chunk size in LLM tokens (default 256)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="float16",
                   help="how KV is stored (default float16); int8: KIVI-style codes, about half of float16's bytes")
    p.add_argument("--index-kind", choices=INDEX_KINDS, default="flat",
                   help="Faiss index: flat (exact, default), hnsw or ivf for large corpora")
    p.add_argument("--chunk-context", choices=CHUNK_CONTEXTS, default=None,
                   help="neighbour (default): also store each chunk's KV computed after its nearest neighbour chunk, "
                        "placed for every chunk but the first at query time (closer to full prefill; ~2x ingest "
                        "compute and KV bytes); none: one entry per chunk. The store keeps it")
    p.add_argument("--linear-dtype", choices=LINEAR_DTYPES, default=None,
                   help="CPU: the linears' weights (default float32); bfloat16 halves what a decode step reads (~1.2x faster decode, "
                   "KL ~5e-4 to float32). The store keeps it: later commands use it by default")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="compute the chunks on Ray workers that write to a shared store (--store redis://...): "
                   "no ADDRESS starts a local cluster; 'auto' joins this machine's cluster; ray://HEAD:10001 "
                   "connects to a remote one")
    p.add_argument("--ray-workers", type=int, default=2, metavar="N", help="Ray actors, each with a model (default 2)")
    p.add_argument("--ray-threads", type=int, default=None, metavar="N",
                   help="torch threads per Ray actor (default: this machine's cores / workers)")
    p.add_argument("--ray-gpus", type=float, default=0, metavar="N", help="GPUs per Ray actor (default 0)")
    p.add_argument("--ray-batch", type=int, default=16, metavar="N",
                   help="chunks per Ray call and per store transaction (default 16)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("query", help="answer a question over a store")
    p.add_argument("question")
    _store_args(p)
    _query_args(p)
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    p.add_argument("--create", action="store_true", help="start an empty store if --store does not exist")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("demo", help="ingest the bundled sample corpus and ask it questions (full vs blend)")
    _store_args(p, default="stores/demo")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="describe a store: models, settings, size")
    _store_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check every stored checksum and the index; --repair fixes what it finds",
                       description="Read every KV entry, metadata and embedding and check its checksum, and check "
                       "that index.faiss matches the store. Exit code 0: clean (or repaired), 1: damage found. "
                       "--repair recomputes damaged KVs and embeddings (loads the models), deletes chunks whose "
                       "metadata is lost (re-run ingest on the sources it names) and rebuilds the index.")
    _store_args(p)
    p.add_argument("--repair", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("copy", help="copy a store into another (e.g. an LMDB store into Redis)",
                       description="Copy every chunk (KV entries byte for byte, metadata, embeddings), the source "
                       "records and the manifest from one store to another, e.g. to move a store built on one "
                       "machine into the shared Redis tier: chunkcache copy --from DIR --to redis://HOST:6379/0")
    p.add_argument("--from", dest="source", required=True, metavar="STORE", help="the store to copy")
    p.add_argument("--to", dest="target", required=True, metavar="STORE", help="where to (empty, or the same kind)")
    p.set_defaults(func=cmd_copy)

    p = sub.add_parser("gc", help="evict KV entries until the store's KV bytes fit a size",
                       description="Evict KV entries (never text, metadata or embeddings: evicted chunks stay "
                       "retrievable and are recomputed on their next use) until the KV payload is at most BYTES "
                       "(default: the store's max_store_bytes). Request entries go first, least recently used "
                       "weighted by recompute cost per byte; ingested entries only after, blind to usage. LMDB "
                       "reuses the freed pages; data.mdb does not shrink.")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"store directory (default {DEFAULT_STORE})")
    p.add_argument("--to", type=_size, default=None, metavar="BYTES", help="target, e.g. 500000000, 800M, 2G")
    p.add_argument("--set-cap", action="store_true", help="also record BYTES as the store's max_store_bytes")
    p.set_defaults(func=cmd_gc)

    sub.add_parser("bench", help="TTFT and fidelity benchmark on MuSiQue (see `chunkcache bench --help`)")

    p = sub.add_parser("serve", help="run the HTTP API (FastAPI under uvicorn)")
    _store_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY[:TENANT]",
                   help="require this bearer key (repeatable); a tenant namespaces its cached chunks "
                   "(also CHUNKCACHE_API_KEYS=key1,key2:tenant)")
    p.add_argument("--admin-key", default=None, metavar="KEY",
                   help="the key that reads /metrics once any key is configured (API keys cannot); prefer "
                   "CHUNKCACHE_ADMIN_KEY, since flags show in the process list")
    p.add_argument("--shared-cache", action="store_true",
                   help="let all tenants share the chunks of their `documents` (their timing then reveals what "
                   "others sent); ingested chunks are shared by every tenant either way")
    p.add_argument("--document-quota", type=_size, default=None, metavar="BYTES", dest="document_quota_bytes",
                   help="KV bytes each tenant may have stored from its request `documents` (e.g. 500M); past it "
                   "they are computed for the request only (default: no limit)")
    p.add_argument("--no-persist-documents", action="store_const", const=False, default=None,
                   dest="persist_documents", help="never store request `documents`: compute their KV per request")
    p.add_argument("--max-body-bytes", type=int, default=None, help="request body limit (default 2 MiB)")
    p.add_argument("--model-name", default=None, help="model id shown by /v1/models")
    p.add_argument("--cors-origin", action="append", dest="cors_origins", metavar="ORIGIN",
                   help="let browser pages from ORIGIN call the API (repeatable; '*' for any origin)")
    p.add_argument("--max-running", type=int, default=None,
                   help="requests the engine batches at once (default 8; 1 serves one at a time)")
    p.add_argument("--max-batched-tokens", type=int, default=None,
                   help="rows in one engine step; a longer prefill is split over steps (default 2048)")
    p.add_argument("--max-prefilling", type=int, default=None,
                   help="requests prefilling at once (default: 1 on CPU, first come first served; "
                   "--max-running on a GPU)")
    p.add_argument("--max-kv-bytes", type=_size, default=None, metavar="BYTES",
                   help="KV cache memory for the running requests, e.g. 4G (default: a quarter of RAM); "
                   "requests that do not fit wait")
    p.add_argument("--mode", choices=MODES, default=None, help="default mode of requests (default blend)")
    p.add_argument("--ratio", type=float, default=None, dest="recompute_ratio",
                   help="default blend recompute ratio (default 0.15)")
    p.add_argument("--top-k", type=int, default=None, help="default chunks retrieved (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default answer length (default 128)")
    p.add_argument("--create", action="store_true", help="start an empty store if --store does not exist")
    p.set_defaults(func=cmd_serve)
    return parser


def _store_args(p: argparse.ArgumentParser, default: str = DEFAULT_STORE) -> None:
    p.add_argument("--store", default=default, help=f"store: a directory (default {default}), redis://HOST:PORT/DB"
                   "[?prefix=NAME] (shared by every server), or lmdb:DIR+redis://... (a local near cache in front)")
    p.add_argument("--model", default=None, help="LLM: 'default' (SmolLM2-135M-Instruct), a HF id or a local dir")
    p.add_argument("--embedder", default=None, help="sentence-transformers model (default all-MiniLM-L6-v2)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-store-bytes", type=_size, default=None, metavar="BYTES",
                   help="cap the stored KV bytes (e.g. 20G): past it, KV entries are evicted and recomputed on "
                   "use; recorded in a new store's manifest, overrides the recorded cap for this run")


def _query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default=None, help="default blend")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--ratio", type=float, default=None, dest="recompute_ratio", help="blend recompute ratio")
    p.add_argument("--check-layer", type=int, default=None)
    p.add_argument("--deviation", choices=DEVIATIONS, default=None)
    p.add_argument("--selection", choices=SELECTIONS, default=None)
    p.add_argument("--chunk-scale", type=_chunk_scale, default=None, metavar="calibrated|off|S",
                   help="attention scale on reused chunks after the first (default calibrated: the model's "
                        "fitted table, none for a model without one)")
    p.add_argument("--scale-queries", choices=SCALE_QUERIES, default=None,
                   help="which queries take the chunk scale: the question's (default) or all recomputed tokens'")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--logprobs", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--doc", action="append", dest="documents", default=None,
                   help="use this text as a chunk instead of retrieval (repeatable)")


def _chunk_scale(text: str):
    if text in CHUNK_SCALES:
        return text
    try:
        value = float(text)
        check_chunk_scale(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if "chunk_scale" in str(exc) else
                                         f"use {' or '.join(CHUNK_SCALES)} or a number, got {text!r}") from None
    return value


def overrides_from(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def settings(args):
    """The settings from CHUNKCACHE_* variables and the settings file (read once, by the commands that use them)."""
    if getattr(args, "settings", None) is None:
        args.settings = load_sources(args.config)
    return args.settings


def config_overrides(args, flag_names) -> dict:
    """ChunkCacheConfig values: the environment's and the settings file's, then the flags given."""
    return {**settings(args).config, **overrides_from(args, flag_names)}


def open_with_settings(args, flag_names, **extra):
    """RAGPipeline.open with the settings as its base config and the flags as overrides: for the settings that
    shape stored tensors an existing store's manifest wins over the base, and a flag contradicting it is refused."""
    from .pipeline import RAGPipeline

    flags = {**overrides_from(args, flag_names), **extra}
    base = ChunkCacheConfig(**{**settings(args).config, **flags})
    return RAGPipeline.open(args.store, config=base, **flags)


def open_pipeline(args, **extra):
    return open_with_settings(args, ("model", "embedder", "device", "threads", "check_layer", "deviation",
                                     "selection", "chunk_scale", "scale_queries", "max_store_bytes",
                                     "document_quota_bytes", "persist_documents", "max_running",
                                     "max_batched_tokens", "max_prefilling", "max_kv_bytes"), **extra)


def cmd_ingest(args) -> int:
    ray = _ray_options(args)
    with open_with_settings(args, ("model", "embedder", "device", "threads", "chunk_tokens", "kv_dtype",
                                   "index_kind", "linear_dtype", "max_store_bytes", "chunk_context")) as pipe:
        report = pipe.ingest(args.paths, progress=not args.no_progress, ray=ray)
        print(report.summary())
        print(_store_line(pipe))
    if report.skipped:
        # Everything readable is stored; the exit status says that not everything was.
        print(f"error: {len(report.skipped)} path(s) or line(s) skipped (listed above); fix or remove them and "
              "re-run (stored chunks are kept)", file=sys.stderr)
        return 1
    return 0


def _ray_options(args):
    if args.ray is None:
        return None
    from .distributed import RayOptions

    if args.ray_workers < 1 or args.ray_batch < 1:
        raise ValueError(f"--ray-workers and --ray-batch must be at least 1, got {args.ray_workers} and "
                         f"{args.ray_batch}")
    from store import parse_store_spec

    from .distributed import worker_store_spec

    worker_store_spec(parse_store_spec(args.store))  # refuses a store the workers cannot reach, before any work
    return RayOptions(address=None if args.ray == "local" else args.ray, workers=args.ray_workers,
                      threads=args.ray_threads, gpus=args.ray_gpus, batch=args.ray_batch)


def existing_store(args) -> None:
    """`query` and `serve` read a store: a path where none exists is most likely mistyped, so say so rather
    than create an empty one (`--create` does; `query --doc` needs none)."""
    from store import parse_store_spec, store_exists

    spec = parse_store_spec(args.store)
    if not args.create and not getattr(args, "documents", None) and not store_exists(spec):
        raise ValueError(f"no store at {spec.describe()}; check --store, build one with `chunkcache ingest PATH "
                         f"--store {spec.describe()}`, or pass --create to start an empty one")


def cmd_query(args) -> int:
    existing_store(args)
    with open_pipeline(args) as pipe:
        return _query(pipe, args)


def _query(pipe, args) -> int:
    kwargs = overrides_from(args, ("mode", "top_k", "recompute_ratio", "max_new_tokens", "documents", "seed"))
    kwargs.update(temperature=args.temperature, top_p=args.top_p, logprobs=args.logprobs)
    if args.stream and not args.json:
        answer = None
        for event in pipe.events(args.question, **kwargs):
            if isinstance(event, str):
                print(event, end="", flush=True)
            else:
                answer = event
        print()
    else:
        answer = pipe.query(args.question, **kwargs)
    if args.json:
        print(json.dumps(answer.to_dict(), indent=2))
        return 0
    if not args.stream:
        print(answer.text)
    print(format_details(answer))
    return 0


def format_details(answer) -> str:
    s, t = answer.stats, answer.timings
    lines = ["", "sources:"]
    for i, src in enumerate(answer.sources, 1):
        score = f"{src.score:.3f}" if src.score is not None else "given"
        snippet = " ".join(src.text.split())[:90]
        lines.append(f"  [{i}] {score} {'hit ' if src.hit else 'miss'} {src.source}: {snippet}")
    lines.append(f"TTFT {answer.ttft_s * 1000:.0f} ms (retrieve {t.retrieve_s * 1000:.0f}, load {t.load_s * 1000:.0f}, "
                 f"prefill {t.prefill_s * 1000:.0f}) | decode {t.decode_s:.2f} s for {s.completion_tokens} tokens")
    lines.append(f"mode {s.mode}: {s.prompt_tokens} prompt tokens, {s.cached_tokens} reused from cache, "
                 f"{s.recomputed_tokens} recomputed ({s.recompute_fraction:.0%} of chunk tokens), "
                 f"chunks {s.chunk_hits} hit / {s.chunk_misses} miss"
                 + (f" ({s.context_chunks} context-enriched)" if s.context_chunks else "")
                 + (f", {s.dropped_chunks} dropped to fit the context" if s.dropped_chunks else ""))
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from .demo_corpus import DEMO_QUESTIONS, write_demo_corpus
    from .pipeline import RAGPipeline

    corpus = write_demo_corpus(cache_home() / "demo_corpus")
    print(f"demo corpus: {corpus} (Python language reference topics from pydoc_data)")
    pipe = RAGPipeline.open(args.store, **overrides_from(args, ("model", "embedder", "device", "threads")))
    print(pipe.ingest([corpus]).summary())
    print(_store_line(pipe))
    for question in DEMO_QUESTIONS:
        print(f"\nQ: {question}")
        for mode in ("full", "blend"):
            answer = pipe.query(question, mode=mode, max_new_tokens=args.max_new_tokens)
            print(f"--- {mode}: {answer.text}")
            print(format_details(answer).split("\n", 2)[2] if mode == "blend" else
                  f"TTFT {answer.ttft_s * 1000:.0f} ms ({answer.stats.prompt_tokens} prompt tokens)")
    return 0


def cmd_info(args) -> int:
    from .storedir import ChunkStore

    with ChunkStore(args.store, readonly=True) as store:
        manifest = store.manifest or {}
        print(json.dumps({"store": str(store.path), "manifest": manifest, "stats": store.kv.stats()}, indent=2,
                         default=str))
    return 0


def cmd_verify(args) -> int:
    from .repair import repair_store, verify_store
    from .storedir import ChunkStore

    if args.repair:
        with open_pipeline(args) as pipe:
            report = repair_store(pipe.rt)
    else:
        with ChunkStore(args.store, readonly=True) as store:
            report, _ = verify_store(store)
    print(report.summary())
    return 0 if report.clean else 1


def cmd_copy(args) -> int:
    from store import open_backend, parse_store_spec, store_exists
    from store.copy import copy_store

    source, target = parse_store_spec(args.source), parse_store_spec(args.target)
    if not store_exists(source):
        raise ValueError(f"no chunkcache store at {source.describe()}; nothing to copy")
    with open_backend(source, readonly=True) as src, open_backend(target) as dst:
        done = copy_store(src, dst)
    print(f"copied {done['chunks']} chunks and {done['sources']} source records from {source.describe()} to "
          f"{target.describe()}" + (f"; {done['evicted_left_out']} chunks without a stored KV left out (re-ingest "
                                    "their sources to restore them)" if done["evicted_left_out"] else ""))
    return 0


def cmd_gc(args) -> int:
    from store import parse_store_spec, store_exists

    from .storedir import ChunkStore

    spec = parse_store_spec(args.store)
    if not store_exists(spec):
        raise ValueError(f"no chunkcache store at {spec.describe()}; nothing to collect")
    with ChunkStore(args.store) as store:
        target = args.to if args.to is not None else (store.manifest or {}).get("max_store_bytes")
        if target is None:
            raise ValueError(f"store {spec.describe()} has no max_store_bytes; give the target size: --to BYTES")
        before = store.kv.kv_bytes()
        evicted, freed = store.kv.evict_to(target)
        if args.set_cap:
            store.write_manifest({**(store.manifest or {}), "max_store_bytes": target})
        print(f"KV bytes: {before} -> {store.kv.kv_bytes()} (target {target}); evicted {evicted} entries, "
              f"{freed} bytes" + ("; max_store_bytes recorded" if args.set_cap else ""))
        if store.kv.kv_bytes() > target:
            print("the prompt prefix alone is over the target; it is never evicted", file=sys.stderr)
    return 0


def _size(text: str) -> int:
    """'800M' -> 838860800; plain integers are bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes, or a number with K, M, G or T)") from None


def cmd_serve(args) -> int:
    from store import parse_store_spec
    from store.lmdbfile import check_data_file

    from .server import serve

    existing_store(args)
    settings(args)  # a bad setting fails here, before the server starts
    # The server opens the store in the background; refuse a damaged one here, with exit code 1.
    spec = parse_store_spec(args.store)
    if spec.local is not None:
        check_data_file(spec.local / "kv.lmdb" / "data.mdb")
    defaults = overrides_from(args, ("mode", "top_k", "recompute_ratio", "max_new_tokens"))
    serve(args, lambda: open_pipeline(args, **defaults))
    return 0


def _store_line(pipe) -> str:
    stats = pipe.rt.store.kv.stats()
    return (f"store {pipe.rt.store_path}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))


if __name__ == "__main__":
    sys.exit(main())

