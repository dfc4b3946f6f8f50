"""Microbenchmark: each blend_kernels Triton kernel vs its torch path on a GPU.

Sizes follow a Llama-3-8B-like cache (32 layers, 8 kv heads, 32 query heads, head_dim 128) at 4k-16k
tokens, with ~15% of tokens selected as attention queries. Times come from CUDA events (median of
--repeats); bandwidth is bytes that must move (each input read once, each output written once)
over time, as a fraction of --peak-tbps (H200: 4.8 TB/s). Results go to
bench/results/kernels-<date>.json and are printed as a markdown table with the configuration.

    python -m bench.kernels                      # GPU
    python -m bench.kernels --cpu                # no GPU: torch paths only, small CPU smoke, plus
                                                 # blocked vs dense attention at the CPU production shape
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import blend_kernels as bk
from blend_kernels.attention.torch_impl import position_causal_attention_torch
from blend_kernels.rope.reference import rerotate_keys_reference

RESULTS_DIR = Path(__file__).parent / "results"
# --cpu sizes: SmolLM2-135M (the CPU default model) on a ~6,100-token blended prompt.
CPU_SHAPE = dict(layers=30, kv_heads=3, q_heads=9, head_dim=64, tokens=6100, select_frac=0.14, suffix=60)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,8192,16384", help="comma-separated cache lengths")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--select-frac", type=float, default=0.15, help="fraction of tokens selected as queries / rows")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--peak-tbps", type=float, default=4.8, help="device peak memory bandwidth, TB/s (H200: 4.8)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="no GPU: time the torch paths on CPU at small sizes")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for --cpu (0: torch default)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/kernels-<date>.json)")
    return p.parse_args(argv)


def time_cuda(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Best-of milliseconds per fn, rounds interleaved so a noisy neighbour hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: min(ts) for name, ts in times.items()}


def select_positions(num_tokens: int, frac: float, suffix: int, device: torch.device) -> torch.Tensor:
    """Query positions as the blend path makes them: a random `frac` of the chunk tokens plus the
    whole suffix, in shuffled order. -> int64 [nq]."""
    g = torch.Generator().manual_seed(0)
    chunk = torch.randperm(num_tokens - suffix, generator=g)[: int(frac * (num_tokens - suffix))]
    pos = torch.cat((chunk, torch.arange(num_tokens - suffix, num_tokens)))
    return pos[torch.randperm(pos.numel(), generator=g)].to(device)


def both_paths(call: Callable[[], object]) -> dict[str, Callable[[], object]]:
    """{'triton': call under the Triton backend, 'torch': call under the torch backend}."""
    def under(path: str) -> Callable[[], object]:
        def run() -> object:
            with bk.use_backend(path):
                return call()
        return run
    return {"triton": under("triton"), "torch": under("torch")}


def gpu_cases(args: argparse.Namespace, num_tokens: int, dev: torch.device = torch.device("cuda")):
    """Yield (kernel, shape text, bytes moved, flops, {path: fn}) for one cache length."""
    dtype = DTYPES[args.dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    L, H, Hq, D = args.layers, args.kv_heads, args.q_heads, args.head_dim
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)

    # The whole request cache in one call, in place on a view of a longer preallocated buffer.
    buffer = torch.randn(L, H, num_tokens + 256, D, device=dev, dtype=dtype)
    keys = buffer[:, :, 128 : 128 + num_tokens]
    deltas = torch.randint(-4096, 4096, (num_tokens,), device=dev)
    shape = f"[{L}, {H}, {num_tokens}, {D}] in place"
    yield "rerotate_keys", shape, 2 * keys.numel() * es, 6 * keys.numel(), both_paths(
        lambda: bk.rerotate_keys(keys, deltas, inv_freq, out=keys)
    )

    fresh = torch.randn(H, num_tokens, D, device=dev, dtype=dtype)
    cached = buffer[1 % L, :, 128 : 128 + num_tokens]
    nbytes = 2 * fresh.numel() * es + 4 * num_tokens
    yield "token_deviation", f"[{H}, {num_tokens}, {D}] x2", nbytes, 3 * fresh.numel(), both_paths(
        lambda: bk.token_deviation(fresh, cached)
    )

    q_pos = select_positions(num_tokens, args.select_frac, 64, dev)
    nq = q_pos.numel()
    rows = torch.randn(H, nq, D, device=dev, dtype=dtype)
    dst = buffer[2 % L, :, 128 : 128 + num_tokens]
    index = torch.sort(q_pos).values
    shape = f"[{H}, {nq}, {D}] -> [{H}, {num_tokens}, {D}]"
    yield "scatter_rows", shape, 2 * rows.numel() * es + 8 * nq, 0, both_paths(
        lambda: bk.scatter_rows(dst, rows, index)
    )

    q = torch.randn(Hq, nq, D, device=dev, dtype=dtype)
    k, v = buffer[3 % L, :, :num_tokens], buffer[4 % L, :, :num_tokens]
    flops = 4 * Hq * D * float((q_pos + 1).sum())  # QK^T and PV over the visible keys only
    nbytes = (2 * q.numel() + 2 * k.numel()) * es  # q in, out, k and v in
    mask = torch.arange(num_tokens, device=dev)[None, :] <= q_pos[:, None]
    paths = both_paths(lambda: bk.position_causal_attention(q, k, v, q_pos))
    paths["dense_sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    yield "position_causal_attention", f"q [{Hq}, {nq}, {D}], kv [{H}, {num_tokens}, {D}]", nbytes, flops, paths


def run_gpu(args: argparse.Namespace) -> list[dict]:
    results = []
    for num_tokens in [int(t) for t in args.tokens.split(",")]:
        for kernel, shape, nbytes, flops, paths in gpu_cases(args, num_tokens):
            for path, fn in paths.items():
                ms = time_cuda(fn, args.warmup, args.repeats)
                results.append(dict(
                    kernel=kernel, path=path, tokens=num_tokens, shape=shape, ms=ms, bytes=nbytes,
                    tb_per_s=nbytes / ms / 1e9, peak_fraction=nbytes / ms / 1e9 / args.peak_tbps,
                    tflop_per_s=flops / ms / 1e9 if flops else None,
                ))
            torch.cuda.empty_cache()
    return results


def run_cpu(args: argparse.Namespace) -> list[dict]:
    """Torch paths on CPU: the attention comparison at the CPU production shape (SmolLM2-135M,
    ~6,100-token prompts, 15% + suffix selected), and a smoke of the other torch paths."""
    results = []
    L, Hk, Hq, D, N = (CPU_SHAPE[k] for k in ("layers", "kv_heads", "q_heads", "head_dim", "tokens"))
    q_pos = select_positions(N, CPU_SHAPE["select_frac"], CPU_SHAPE["suffix"], torch.device("cpu"))
    nq = q_pos.numel()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(h, n, D, generator=g) for h, n in ((Hq, nq), (Hk, N), (Hk, N)))
    mask = torch.arange(N)[None, :] <= q_pos[:, None]
    paths = {
        "torch (blocked)": lambda: bk.position_causal_attention(q, k, v, q_pos),
        "torch, 1 block": lambda: position_causal_attention_torch(q, k, v, q_pos, D**-0.5, max_blocks=1),
        "dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
    }
    shape = f"q [{Hq}, {nq}, {D}], kv [{Hk}, {N}, {D}]"
    for path, ms in time_cpu(paths, args.warmup, args.repeats).items():
        results.append(dict(kernel="position_causal_attention", path=path, tokens=N, shape=shape, ms=ms))

    keys = torch.randn(L, Hk, N, D)
    deltas = torch.randint(-2000, 2000, (N,))
    inv_freq = 1.0 / 100000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    fresh, cached = torch.randn(Hk, N, D), keys[1]
    rows, index = torch.randn(Hk, nq, D), torch.sort(q_pos).values
    smoke = {
        ("rerotate_keys", f"[{L}, {Hk}, {N}, {D}] in place"):
            lambda: bk.rerotate_keys(keys, deltas, inv_freq, out=keys),
        ("token_deviation", f"[{Hk}, {N}, {D}] x2"): lambda: bk.token_deviation(fresh, cached),
        ("scatter_rows", f"[{Hk}, {nq}, {D}] -> [{Hk}, {N}, {D}]"): lambda: bk.scatter_rows(keys[2], rows, index),
    }
    with bk.use_backend("torch"):
        timed = time_cpu(smoke, 1, max(3, args.repeats // 4))
    for (kernel, shape), ms in timed.items():
        results.append(dict(kernel=kernel, path="torch", tokens=N, shape=shape, ms=ms))
    # The naive fp32 reference, to show what the torch path's fused writes save.
    ms = time_cpu({"reference": lambda: rerotate_keys_reference(keys, deltas, inv_freq)}, 1, max(3, args.repeats // 4))
    results.append(dict(kernel="rerotate_keys", path="reference", tokens=N, shape=f"[{L}, {Hk}, {N}, {D}] new tensor",
                        ms=ms["reference"]))
    return results


def configuration(args: argparse.Namespace) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if args.cpu:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        sizes = dict(CPU_SHAPE, dtype="fp32")
    else:
        device = torch.cuda.get_device_name()
        sizes = dict(layers=args.layers, kv_heads=args.kv_heads, q_heads=args.q_heads, head_dim=args.head_dim,
                     tokens=args.tokens, select_frac=args.select_frac, dtype=args.dtype, peak_tbps=args.peak_tbps)
    return dict(
        date=dt.datetime.now().isoformat(timespec="seconds"), mode="cpu" if args.cpu else "cuda", device=device,
        torch=torch.__version__, triton=triton_version, python=platform.python_version(), **sizes,
        repeats=args.repeats,
        # CPU timings on a shared box swing wildly (OpenMP threads spin while a neighbour holds a core).
        load_avg_1m=round(os.getloadavg()[0], 2), cpu_count=os.cpu_count(),
    )


def add_speedups(results: list[dict]) -> None:
    """speedup = baseline ms / ms within each (kernel, tokens); the baseline is the first path present
    of dense_sdpa (one dense masked SDPA call), reference (the naive fp32 code), torch."""
    for r in results:
        group = {o["path"]: o for o in results if o["kernel"] == r["kernel"] and o["tokens"] == r["tokens"]}
        base = next((group[p] for p in ("dense_sdpa", "reference", "torch") if p in group), None)
        if base is None or base is r:
            r["baseline"] = r["speedup"] = None
        else:
            r["baseline"], r["speedup"] = base["path"], base["ms"] / r["ms"]


def markdown(results: list[dict]) -> str:
    lines = [
        "| kernel | tokens | shape | path | ms | speedup (vs) | TB/s | % of peak BW | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speedup = f"{r['speedup']:.2f}x ({r['baseline']})" if r.get("speedup") is not None else "-"
        tbs = f"{r['tb_per_s']:.2f}" if r.get("tb_per_s") is not None else "-"
        frac = f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") is not None else "-"
        tflops = f"{r['tflop_per_s']:.1f}" if r.get("tflop_per_s") is not None else "-"
        cells = [r["kernel"], r["tokens"], r["shape"], r["path"], f"{r['ms']:.3f}", speedup, tbs, frac, tflops]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("bench/kernels.py: CUDA is not available on this machine, so there is nothing to compare the "
              "Triton kernels on. Run it on a GPU, or pass --cpu for a CPU smoke of the torch paths.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    config = configuration(args)
    results = run_cpu(args) if args.cpu else run_gpu(args)
    add_speedups(results)
    out = args.out or RESULTS_DIR / f"kernels-{dt.date.today().isoformat()}{'-cpu' if args.cpu else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=config, results=results), indent=2) + "\n")
    print("## configuration")
    for key, value in config.items():
        print(f"- {key}: {value}")
    print()
    print(markdown(results))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
