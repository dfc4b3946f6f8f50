"""Ingest benchmark: chunk-KV throughput and store size on the dev set's passages.

    python -m bench.ingest                       # all passages, into a fresh temporary store
    python -m bench.ingest --limit 5 --store DIR # the passages of the first 5 questions, kept in DIR

Each passage (f"{title}\\n{text}") is one chunk, as the RAG benchmark passes it in `documents`, so
`build_store` also fills the store `bench.run` reads from. Reported: chunks/s and tokens/s (KV
compute, embedding and LMDB writes; KV compute alone apart), and the store's bytes per token
against the fp16 figure layers x 2 x kv_heads x head_dim x 2 (23,040 B for SmolLM2-135M).
Results go to bench/results/ingest-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.data import DEFAULT_DATA, load_questions, passage_documents
from bench.envinfo import dump_json, environment, next_free_path
from chunkcache.config import CHUNK_CONTEXTS, ChunkCacheConfig
from chunkcache.context import enrich_chunks, enriched
from chunkcache.ingest import IngestReport, PendingChunk, ensure_prefix, store_chunks
from chunkcache.prompt import chunk_token_ids

RESULTS_DIR = Path(__file__).parent / "results"


def build_store(pipe, documents: list[tuple[str, str]], *, embed: bool = False, progress: bool = True) -> dict:
    """Store the KV of every document not yet stored, keyed exactly as `evaluate(documents=...)` keys them.

    Args:
        pipe: an open RAGPipeline.
        documents: (source label, text) pairs; duplicates by token ids are stored once.
        embed: also embed the chunks and add them to the Faiss index (what `chunkcache ingest` does).

    Returns:
        figures of this build: chunks, chunks_computed, chunks_already_stored, tokens_computed, seconds
        (wall, prefix included), seconds_kv, seconds_embed, chunks_per_s, tokens_per_s (over wall
        seconds), kv_tokens_per_s (KV compute alone), and the store's size (`store` = kv.stats(),
        bytes_per_token, fp16_bytes_per_token, size_vs_fp16).
    """
    rt = pipe.rt
    tokenizer = rt.lm.tokenizer
    pending = []
    for source, text in documents:
        ids = chunk_token_ids(tokenizer, text)
        pending.append(PendingChunk(rt.key_for(ids), ids, text.strip(), {
            "source": source, "text": text.strip(), "token_ids": ids, "num_tokens": len(ids),
            "namespace": rt.config.namespace}))
    unique = list({c.key: c for c in pending}.values())
    started = time.perf_counter()
    ensure_prefix(rt)
    report = IngestReport()
    todo = len(rt.store.kv.missing([c.key for c in unique]))
    bar = tqdm(total=todo, unit="chunk", desc="store", disable=not progress or todo == 0, dynamic_ncols=True)
    # A context-enriched store finds each chunk's neighbour by its embedding (chunkcache/context.py).
    embed = embed or enriched(rt)
    try:
        store_chunks(rt, unique, report=report, bar=bar, embed=embed)
        t = time.perf_counter()
        report.context_entries, report.context_tokens = enrich_chunks(rt, [c.key for c in unique])
        report.seconds_context = time.perf_counter() - t
    finally:
        bar.close()
        if embed:
            rt.store.save_index()
    seconds = time.perf_counter() - started
    stats = rt.store.kv.stats()
    fp16 = rt.lm.kv_bytes_per_token(torch.float16)
    return {
        "chunks": len(unique), "chunks_computed": report.chunks_computed,
        "chunks_already_stored": len(unique) - report.chunks_computed,
        "tokens": sum(len(c.token_ids) for c in unique), "tokens_computed": report.tokens_computed,
        "seconds": seconds, "seconds_kv": report.seconds_kv, "seconds_embed": report.seconds_embed,
        "chunks_per_s": report.chunks_computed / seconds if report.chunks_computed else 0.0,
        "tokens_per_s": report.tokens_computed / seconds if report.tokens_computed else 0.0,
        "kv_tokens_per_s": report.tokens_per_s, "embedded": embed, "chunk_context": rt.config.chunk_context,
        "context_entries": report.context_entries, "context_tokens": report.context_tokens,
        "seconds_context": report.seconds_context,
        "store": stats, "bytes_per_token": stats["bytes_per_token"], "fp16_bytes_per_token": fp16,
        "size_vs_fp16": stats["bytes_per_token"] / fp16 if fp16 else float("nan"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"questions JSONL (default {DEFAULT_DATA})")
    p.add_argument("--limit", type=int, default=None, help="only the passages of the first N questions")
    p.add_argument("--store", type=Path, default=None,
                   help="store directory (default: a fresh temporary one, removed afterwards); an existing "
                        "store only computes what it lacks")
    p.add_argument("--model", default="default")
    p.add_argument("--kv-dtype", default="float16", choices=("float16", "bfloat16", "float32", "int8"))
    p.add_argument("--chunk-context", default=None, choices=CHUNK_CONTEXTS,
                   help="also store each chunk after its nearest neighbour (neighbour) or not (none); default: "
                        f"an existing --store's recipe, else {ChunkCacheConfig.chunk_context}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-embed", action="store_true", help="KV only: skip embedding and the Faiss index")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=f"where the JSON goes (default {RESULTS_DIR})")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run_ingest_benchmark(args: argparse.Namespace, *, lm=None, embedder=None) -> Path:
    """Build a store from the passages and write bench/results/ingest-<date>.json; returns its path."""
    from chunkcache import RAGPipeline

    questions = load_questions(args.data, args.limit)
    documents = passage_documents(questions, args.data.stem)
    temp = None if args.store else tempfile.mkdtemp(prefix="chunkcache-ingest-bench-")
    store_dir = args.store or Path(temp) / "store"
    overrides = {"kv_dtype": args.kv_dtype, **({"threads": args.threads} if args.threads else {}),
                 **({"chunk_context": args.chunk_context} if args.chunk_context else {})}
    try:
        pipe = RAGPipeline.open(store_dir, model=args.model, lm=lm, embedder=embedder, **overrides)
        try:
            env = environment(pipe)
            print(format_config(env, args, len(questions), len(documents)), flush=True)
            figures = build_store(pipe, documents, embed=not args.no_embed, progress=not args.no_progress)
        finally:
            pipe.close()
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    result = {"kind": "chunkcache-bench-ingest", "version": 1,
              "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "config": {**env, "data": str(args.data), "questions": len(questions),
                         "passages": len(documents), "store_dir": str(args.store) if args.store else None},
              "ingest": figures}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = next_free_path(args.out_dir / f"ingest-{dt.date.today().isoformat()}.json")
    path.write_text(dump_json(result))
    print(format_figures(figures))
    print(f"wrote {path}")
    return path


def format_config(env: dict, args, num_questions: int, num_passages: int) -> str:
    return (f"ingest benchmark: {num_passages} passages of {num_questions} questions from {args.data}\n"
            f"  model {env['model']} ({env['model_fingerprint'][:16]}), {env['compute_dtype']} on {env['device']}, "
            f"KV {env['kv_dtype']}, {env['threads']} threads, torch {env['torch']}, CPU {env['cpu']}, "
            f"commit {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}")


def format_figures(f: dict) -> str:
    return (f"{f['chunks']} chunks ({f['chunks_computed']} computed, {f['chunks_already_stored']} already stored), "
            f"{f['tokens_computed']:,} tokens in {f['seconds']:.1f} s: {f['chunks_per_s']:.2f} chunks/s, "
            f"{f['tokens_per_s']:.0f} tokens/s (KV compute alone {f['kv_tokens_per_s']:.0f} tokens/s); "
            f"store {f['bytes_per_token']:,.0f} B/token = {f['size_vs_fp16']:.2f} x fp16 "
            f"({f['fp16_bytes_per_token']:,} B/token)")


def main(argv: list[str] | None = None) -> int:
    run_ingest_benchmark(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
