"""GPU benchmark and check: the whole query path on CUDA (Triton kernels), at real model shapes.

No model weights reach a lent GPU machine here (nothing can be downloaded there, and the GGUF is
larger than what may travel), so the models are random-init at the shapes of SmolLM2-135M and
Llama-3-8B, in bf16. Time depends on shapes, not on weights. On random weights the fidelity
figures mean nothing, with two exceptions that check the CUDA path:
  - blend at ratio 1.0 must equal full prefill (KL ~0, bf16 noise only);
  - reuse must differ from full (KL > 0): otherwise the check above would pass vacuously.

    python -m bench.gpu                                  # both shapes, 5 questions
    python -m bench.gpu --shapes llama-3-8b --limit 10 --tokenizer DIR --out-dir DIR

Per shape: bench.run's RAG benchmark on the MuSiQue dev prompts (~6.1k tokens; TTFT of full, reuse
and blend), then the engine: --batch questions answered one at a time and then submitted together
(greedy tokens compared, completion tokens per second). Results: bench.run's files per shape, and
gpu-<date>.json with the engine figures and the checks, in --out-dir.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import metrics
from bench.data import DEFAULT_DATA, load_questions
from bench.envinfo import dump_json, next_free_path
from bench.run import BenchConfig, run_benchmark

RESULTS_DIR = Path(__file__).parent / "results" / "gpu"
# Llama-family shapes (SmolLM2 is a Llama); the tokenizer's vocabulary replaces theirs.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, rope_theta=500000.0, tie_word_embeddings=False),
}
MODES = ("full", "reuse", "blend-0.15-probe", "blend-0.15-probe-s0.35", "blend-0.15", "blend-1.00")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: SmolLM2's, from its GGUF)")
    p.add_argument("--limit", type=int, default=5, help="MuSiQue dev questions for the RAG benchmark")
    p.add_argument("--batch", type=int, default=8, help="questions for the engine check")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--profile", action="store_true",
                   help="instead: profile one question per mode (cProfile and torch.profiler tables)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to smoke-test this script")
    return p.parse_args(argv)


def load_tokenizer(directory: str | None):
    from transformers import AutoTokenizer

    if directory:
        return AutoTokenizer.from_pretrained(directory)
    from chunkcache.models import default_gguf_path

    gguf = default_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def random_model(shape: str, tokenizer, device: torch.device):
    """A random-init Llama of `shape` in bf16 on `device`, ready for the blend path."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chunkcache.models import prepare_model

    dims = dict(SHAPES[shape])
    theta = dims.pop("rope_theta")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=16384,
                         rope_parameters={"rope_type": "default", "rope_theta": theta},
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **dims)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: an 8B model takes seconds on a GPU, minutes on a CPU
        # from_config's dtype keeps RoPE's inv_freq in fp32, as loading a checkpoint does (.to() would not).
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return prepare_model(model, tokenizer, spec=f"random-{shape}", device=device, weights_id=f"random-{shape}-seed0")


def engine_check(lm, store: Path, questions, max_new_tokens: int) -> dict:
    """Blend answers one at a time, then all submitted at once: same greedy tokens? tokens/s of each."""
    from chunkcache import Answer, RAGPipeline
    from retriever.hashing import HashingEmbedder

    kwargs = dict(mode="blend", recompute_ratio=0.15, max_new_tokens=max_new_tokens)
    with RAGPipeline.open(store, lm=lm, embedder=HashingEmbedder(), kv_dtype="bfloat16") as pipe:
        pipe.query(questions[0].question, documents=list(questions[0].documents), **kwargs)  # warm
        started = time.perf_counter()
        alone = [pipe.query(q.question, documents=list(q.documents), **kwargs) for q in questions]
        alone_s = time.perf_counter() - started
        started = time.perf_counter()
        tickets = [pipe.submit(q.question, documents=list(q.documents), **kwargs) for q in questions]
        batched = [[e for e in t if isinstance(e, Answer)][0] for t in tickets]
        batched_s = time.perf_counter() - started
    same = [a.token_ids == b.token_ids for a, b in zip(alone, batched)]
    tokens = sum(a.stats.completion_tokens for a in batched)
    return {"questions": len(questions), "identical_greedy": sum(same), "completion_tokens": tokens,
            "alone_s": alone_s, "batched_s": batched_s,
            "alone_tokens_per_s": sum(a.stats.completion_tokens for a in alone) / alone_s,
            "batched_tokens_per_s": tokens / batched_s,
            "alone_ttft_median_s": metrics.median([a.ttft_s for a in alone]),
            "batched_ttft_median_s": metrics.median([b.ttft_s for b in batched]),
            "first_difference": next(([i, a.token_ids, b.token_ids] for i, (a, b) in enumerate(zip(alone, batched))
                                      if a.token_ids != b.token_ids), None)}


def profile(lm, store: Path, question, max_new_tokens: int) -> None:
    """Where a query's time goes, per mode: cProfile of the engine thread (which runs the model), by
    own time and by cumulative time. On CUDA, a synchronising call's own time includes the device
    work queued before it."""
    import cProfile
    import io
    import pstats

    from chunkcache import RAGPipeline
    from retriever.hashing import HashingEmbedder

    with RAGPipeline.open(store, lm=lm, embedder=HashingEmbedder(), kv_dtype="bfloat16") as pipe:
        engine_step = pipe.engine._step
        for mode, ratio in (("full", None), ("reuse", None), ("blend", 0.15)):
            kwargs = dict(documents=list(question.documents), mode=mode, recompute_ratio=ratio,
                          max_new_tokens=max_new_tokens)
            for _ in range(2):  # warm: kernels compiled, chunks stored
                pipe.query(question.question, **kwargs)
            profiler = cProfile.Profile()

            def profiled_step():
                profiler.enable()
                try:
                    engine_step()
                finally:
                    profiler.disable()

            pipe.engine._step = profiled_step  # the engine thread looks it up on every step
            answer = pipe.query(question.question, **kwargs)
            pipe.engine._step = engine_step
            print(f"== {mode}: {answer.timings}, {answer.stats.completion_tokens} tokens", flush=True)
            for order in ("tottime", "cumtime"):
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(25 if order == "tottime" else 30)
                print(text.getvalue().split("\n\n", 2)[-1], flush=True)


def checks(summary: dict) -> dict:
    """The two fidelity figures that mean something on random weights."""
    return {"blend_1.00_kl_mean": summary["blend-1.00"]["kl_mean"], "blend_1.00_top1": summary["blend-1.00"]["top1"],
            "reuse_kl_mean": summary["reuse"]["kl_mean"],
            "blend_1.00_equals_full": summary["blend-1.00"]["kl_mean"] < 1e-2 < summary["reuse"]["kl_mean"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu needs a CUDA device (the CPU path is what bench.run measures)", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer)
    questions = load_questions(args.data, max(args.limit, args.batch))
    out = {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "shapes": {}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SHAPES:
            print(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        lm = random_model(shape, tokenizer, device)
        if args.profile:  # tables on stdout only
            with tempfile.TemporaryDirectory() as tmp:
                profile(lm, Path(tmp) / "store", questions[0], args.max_new_tokens)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "store"
            cfg = BenchConfig(data=args.data, limit=args.limit, modes=MODES, max_new_tokens=args.max_new_tokens,
                              model=f"random-{shape}", store=store, kv_dtype="bfloat16", out_dir=args.out_dir,
                              progress=False)
            from retriever.hashing import HashingEmbedder

            result = run_benchmark(cfg, lm=lm, embedder=HashingEmbedder())
            engine = engine_check(lm, store, questions[:args.batch], args.max_new_tokens)
        summary = result["summary"]
        out["shapes"][shape] = {"rag": {m: {k: summary[m][k] for k in ("ttft_median_s", "speedup", "kl_mean", "top1",
                                                                          "recompute_fraction", "decode_s_per_token")}
                                        for m in summary},
                                "checks": checks(summary), "engine": engine, "files": result["paths"]}
        print(f"{shape}: checks {out['shapes'][shape]['checks']}\n  engine {engine}", flush=True)
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.profile:
        return 0
    path = next_free_path(args.out_dir / f"gpu-{dt.date.today().isoformat()}.json")
    path.write_text(dump_json(out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
