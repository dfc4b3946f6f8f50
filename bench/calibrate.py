"""Fit the attention scale on reused chunks by minimising KL to full prefill on dev questions.

    python -m bench.calibrate                      # fit on dev 0-24, report on 25-49, write the calibration
    python -m bench.calibrate --granularity layer --no-write

Reused chunks after the first were encoded without the chunks before them, and the question
attends to them as if each were the start of a document: too much attention mass lands on them
(APE, "Adaptive Parallel Encoding", reports the same). chunkcache multiplies the attention weight
of those chunks' rows by S, per layer and query head, and renormalises (a log(S) bias on the
logits: `blend.chunk_key_bias`). This script fits log(S) label-free: the best single S on a grid first, then Adam
on per-layer (or per-head) log(S) from there, minimising the mean teacher-forced KL(full || reuse+S)
along full's greedy answer. The cached chunk KV is fixed, so only the question and answer tokens
run through the model (a differentiable copy of the reuse
path of `forward.forward_tokens`, checked against it at S = 1 before fitting).

Fitting uses questions `--fit` only; `--eval` questions are reported, never fitted. The result is
written to chunkcache/calibrations/<model>.json, which the pipeline loads for that model.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.data import DEFAULT_DATA, load_questions
from bench.reference import CACHE_ROOT, ensure_references, open_bench_pipeline

GRANULARITIES = ("scalar", "layer", "head")


@dataclass
class Sample:
    """One question ready for the differentiable reuse forward."""

    id: str
    ctx_k: torch.Tensor  # [layers, kv_heads, n_ctx, D]: prefix + re-rotated chunk rows (fixed)
    ctx_v: torch.Tensor
    stale: tuple[int, int]  # [start, end) of the chunks that lost their context (chunks 2..k)
    token_ids: torch.Tensor  # suffix + forced answer tokens but the last, int64 [n]
    first_scored: int  # row of token_ids whose logits predict forced[0] (the last suffix token)
    reference: torch.Tensor  # full's log-probs along the forced answer, fp32 [len(forced), vocab]


# A differentiable copy of the Llama layer (the serving loop runs under inference_mode and drives
# transformers' layers, which a gradient cannot pass through).
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")


def _project_qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lm):
    """x: [n, hidden] -> q [q_heads, n, D], k [kv_heads, n, D] (both after RoPE), v [kv_heads, n, D]."""
    from chunkcache.rope import apply_rope

    n = x.shape[0]
    q = attn.q_proj(x).view(n, lm.num_q_heads, lm.head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(n, lm.num_kv_heads, lm.head_dim).transpose(0, 1)
    v = attn.v_proj(x).view(n, lm.num_kv_heads, lm.head_dim).transpose(0, 1)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 normalizes q/k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def load_sample(pipe, q, ref: dict) -> Sample:
    req = pipe._request(q.question, None, list(q.documents), "reuse", None, 1, 0.0, 1.0, 0, None, None)
    prep = pipe._prepare(req)
    layout = prep.layout
    n_ctx = layout.suffix_start
    stale_start = layout.chunk_starts[1] if len(layout.chunk_lens) > 1 else n_ctx
    forced = list(ref["forced_ids"])
    ids = torch.cat((prep.prompt_ids[n_ctx:], torch.tensor(forced[:-1], dtype=torch.long)))
    return Sample(q.id, prep.cache.k[:, :, :n_ctx].clone(), prep.cache.v[:, :, :n_ctx].clone(),
                  (stale_start, n_ctx), ids, layout.suffix_len - 1, ref["reference"])


def reuse_logprobs(lm, s: Sample, log_scale: torch.Tensor | None,
                   log_temp: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs of the forced answer positions in reuse mode with log(S) on the stale chunk rows.

    log_scale: [layers, 1 or q_heads] (differentiable) or None. log_temp: the same shape or None,
    a temperature T on the stale rows' logits (APE's other knob; explored here, not served).
    -> fp32 [len(forced), vocab].
    """
    model = lm.hf_model.model
    if lm.config.model_type not in LLAMA_LAYOUT:
        raise SystemExit(f"bench.calibrate fits on the Llama layer layout ({', '.join(LLAMA_LAYOUT)}), "
                         f"not {lm.config.model_type!r}")
    n_ctx = s.ctx_k.shape[2]
    n = len(s.token_ids)
    positions = torch.arange(n_ctx, n_ctx + n)
    cos, sin = (t[0] for t in lm.parts.rotary_tables(positions, lm.dtype)[None])
    h = model.embed_tokens(s.token_ids)
    group = lm.num_q_heads // lm.num_kv_heads
    mask = torch.zeros(n, n_ctx + n)
    mask[:, n_ctx:] = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
    in_stale = torch.zeros(n_ctx + n, dtype=torch.bool)
    in_stale[s.stale[0]:s.stale[1]] = True
    for index, layer in enumerate(model.layers):
        q, k, v = _project_qkv(layer.self_attn, layer.input_layernorm(h), cos, sin, lm)
        keys = torch.cat((s.ctx_k[index], k), dim=1).repeat_interleave(group, dim=0)
        values = torch.cat((s.ctx_v[index], v), dim=1).repeat_interleave(group, dim=0)
        scores = q @ keys.transpose(1, 2) * layer.self_attn.scaling + mask
        if log_temp is not None:
            inv_t = torch.where(in_stale, torch.exp(-log_temp[index])[:, None], 1.0)  # [heads, keys]
            scores = scores * inv_t[:, None, :]
        if log_scale is not None:
            scores = scores + torch.where(in_stale, log_scale[index][:, None], 0.0)[:, None, :]
        attn = torch.softmax(scores, dim=-1) @ values
        h = h + layer.self_attn.o_proj(attn.transpose(0, 1).reshape(n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = lm.hf_model.lm_head(model.norm(h[s.first_scored:])).float()
    return torch.log_softmax(logits, dim=-1)


def kl_to_full(reference: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(full || mode), as bench.metrics.fidelity computes it."""
    return (reference.exp() * (reference - logprobs)).sum(-1).mean()


def evaluate(lm, samples: list[Sample], log_scale: torch.Tensor | None, log_temp: torch.Tensor | None = None) -> dict:
    kls, top1 = [], []
    with torch.no_grad():
        for s in samples:
            lp = reuse_logprobs(lm, s, log_scale, log_temp)
            kls.append(kl_to_full(s.reference, lp).item())
            top1.append((lp.argmax(-1) == s.reference.argmax(-1)).float().mean().item())
    return {"kl_mean": sum(kls) / len(kls), "top1": sum(top1) / len(top1), "per_question_kl": kls}


def compare(lm, samples: list[Sample], log_scale, log_temp) -> dict:
    return merge([{"base": evaluate(lm, [s], None), "tuned": evaluate(lm, [s], log_scale, log_temp)}
                  for s in samples])


def merge(rows: list[dict]) -> dict:
    """Mean reuse and reuse+S figures over per-question results."""
    def mean(which, key):
        return sum(r[which][key] for r in rows) / len(rows)
    return {"questions": len(rows),
            "reuse": {k: mean("base", k) for k in ("kl_mean", "top1")},
            "reuse_scaled": {k: mean("tuned", k) for k in ("kl_mean", "top1")}}


GRID = (0.15, 0.25, 0.35, 0.5, 0.7, 1.0)


def best_uniform_scale(lm, samples: list[Sample], progress: bool = True) -> float:
    """The one S (all layers and heads) with the lowest mean KL on `samples`: the fit's starting point."""
    results = {}
    for value in GRID:
        log_scale = torch.full((lm.num_layers, 1), math.log(value))
        results[value] = evaluate(lm, samples, log_scale)["kl_mean"]
        if progress:
            print(f"  uniform S {value:.2f}: KL {results[value]:.4f}", flush=True)
    return min(results, key=results.get)


def fit(lm, samples: list[Sample], granularity: str, *, steps: int = 40, lr: float = 0.1, batch: int = 0,
        init: float = 1.0, temperature: bool = False, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adam on log(S) (and log(T) with `temperature`) from S = `init` -> ([layers, 1 or q_heads], same or
    None), detached. batch > 0: each step uses the next `batch` questions in turn (cheaper steps)."""
    shape = {"scalar": (1, 1), "layer": (lm.num_layers, 1), "head": (lm.num_layers, lm.num_q_heads)}[granularity]
    full_shape = (lm.num_layers, shape[1])
    scale = torch.full(shape, math.log(init), requires_grad=True)
    temp = torch.zeros(shape, requires_grad=True) if temperature else None
    opt = torch.optim.Adam([scale] + ([temp] if temp is not None else []), lr=lr)
    for p in lm.hf_model.parameters():
        p.requires_grad_(False)
    for step in range(steps):
        started = time.perf_counter()
        opt.zero_grad()
        total = 0.0
        part = samples if not batch else [samples[(step * batch + i) % len(samples)] for i in range(batch)]
        for s in part:
            log_temp = temp.expand(full_shape) if temp is not None else None
            loss = kl_to_full(s.reference, reuse_logprobs(lm, s, scale.expand(full_shape), log_temp)) / len(part)
            loss.backward()
            total += loss.item()
        opt.step()
        if progress:
            extra = f", mean T {temp.detach().exp().mean():.3f}" if temp is not None else ""
            print(f"  step {step + 1}/{steps}: batch KL {total:.4f}, mean S {scale.detach().exp().mean():.3f}{extra} "
                  f"({time.perf_counter() - started:.1f} s)", flush=True)
    fitted_temp = temp.detach().expand(full_shape).clone() if temp is not None else None
    return scale.detach().expand(full_shape).clone(), fitted_temp


def parse_range(text: str) -> range:
    a, _, b = text.partition("-")
    return range(int(a), int(b or a) + 1)


def split_args(p: argparse.ArgumentParser) -> None:
    """The arguments every fit shares: the data, the fit and report halves, the model, no-write."""
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--fit", default="0-24", help="question numbers to fit on (default %(default)s)")
    p.add_argument("--eval", default="25-49", help="question numbers to report on (default %(default)s)")
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-write", action="store_true", help="report only; do not write the calibration file")


def split_of(a: argparse.Namespace) -> tuple[range, range, list]:
    """(fit ids, report ids, the questions up to the last of them); exits 2 when the halves overlap."""
    fit_ids, eval_ids = parse_range(a.fit), parse_range(a.eval)
    if set(fit_ids) & set(eval_ids):
        print("error: --fit and --eval overlap; report on questions the fit never saw", file=sys.stderr)
        raise SystemExit(2)
    return fit_ids, eval_ids, load_questions(a.data, max(max(fit_ids), max(eval_ids)) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    split_args(p)
    p.add_argument("--granularity", choices=GRANULARITIES, default="head")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=10, help="questions per step, taken in turn (0: all)")
    p.add_argument("--temperature", action="store_true",
                   help="also fit a temperature T on the stale rows (exploration: reported, never written)")
    a = p.parse_args(argv)
    fit_ids, eval_ids, questions = split_of(a)
    # Only the fit questions' chunks are stored up front; a held-out question's misses are computed
    # (and stored) when it is reported.
    # Reuse's table is fitted on plain entries; context-enriched ones take their own S (bench.calibrate_blend).
    pipe = open_bench_pipeline(a.model, a.threads, questions=[questions[i] for i in fit_ids], data=a.data,
                               chunk_context="none")
    try:
        lm = pipe.rt.lm
        root = CACHE_ROOT / lm.fingerprint[:16]

        def samples_of(ids: range) -> list[Sample]:
            refs = ensure_references(pipe, [questions[i] for i in ids], root)
            return [load_sample(pipe, questions[i], ref) for i, ref in zip(ids, refs)]

        train = samples_of(fit_ids)
        check_against_pipeline(lm, train[0])
        started = time.perf_counter()
        init = best_uniform_scale(lm, train)
        log_scale, log_temp = fit(lm, train, a.granularity, steps=a.steps, lr=a.lr, batch=a.batch, init=init,
                                  temperature=a.temperature)
        seconds = time.perf_counter() - started
        report = {"granularity": a.granularity, "temperature": a.temperature, "fit_questions": f"{a.fit}",
                  "eval_questions": f"{a.eval}", "uniform_start": init, "steps": a.steps, "lr": a.lr,
                  "batch": a.batch, "fit_seconds": seconds}
        report["fit"] = compare(lm, train, log_scale, log_temp)
        del train
        # Held-out questions are loaded only now, one at a time (each holds ~280 MB of fp32 KV):
        # nothing of them can reach the fit.
        held = ({"base": evaluate(lm, [s], None), "tuned": evaluate(lm, [s], log_scale, log_temp)}
                for s in map(lambda ids: samples_of(ids)[0], (range(i, i + 1) for i in eval_ids)))
        report["eval"] = merge(list(held))
    finally:
        pipe.close()
    for name in ("fit", "eval"):
        base, tuned = report[name]["reuse"], report[name]["reuse_scaled"]
        print(f"{name}: reuse KL {base['kl_mean']:.4f} top-1 {base['top1']:.3f} -> "
              f"with S KL {tuned['kl_mean']:.4f} top-1 {tuned['top1']:.3f}")
    print("S per layer (mean over heads):", " ".join(f"{x:.2f}" for x in log_scale.exp().mean(1).tolist()))
    if log_temp is not None:
        print("T per layer (mean over heads):", " ".join(f"{x:.2f}" for x in log_temp.exp().mean(1).tolist()))
    if not a.no_write and not a.temperature:
        from chunkcache.calibration import write_calibration
        path = write_calibration(lm, log_scale, {**report, "created": dt.date.today().isoformat()})
        print(f"wrote {path}")
    print(json.dumps(report, indent=1))
    return 0


def check_against_pipeline(lm, s: Sample) -> None:
    """The differentiable forward at S = 1 must give reuse mode's own teacher-forced log-probs."""
    from chunkcache.forward import forward_tokens
    from chunkcache.kvcache import new_cache

    n_ctx = s.ctx_k.shape[2]
    cache = new_cache(lm, n_ctx + len(s.token_ids))
    cache.k[:, :, :n_ctx] = s.ctx_k
    cache.v[:, :, :n_ctx] = s.ctx_v
    got = forward_tokens(lm, cache, s.token_ids, torch.arange(n_ctx, n_ctx + len(s.token_ids)), all_logits=True)
    expected = torch.log_softmax(got.logits[s.first_scored:].float(), dim=-1)
    with torch.no_grad():
        mine = reuse_logprobs(lm, s, None)
    err = (mine - expected).abs().max().item()
    if err > 1e-3:
        raise AssertionError(f"the calibration forward differs from forward_tokens by {err:.3g} at S = 1")
    print(f"calibration forward matches forward_tokens (max |d log p| {err:.2e})")


if __name__ == "__main__":
    sys.exit(main())
