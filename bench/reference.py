"""Full prefill's reference for the fidelity work, computed once per question and cached on disk.

    python -m bench.reference                    # all dev questions, into .cache/fidelity/<model>/
    python -m bench.reference --limit 5

Per question, one full prefill gives everything the oracles and the calibration need:
  - full's greedy answer as forced ids and its next-token log-probs along it (the fidelity
    reference, exactly what `bench.run` compares every mode against);
  - per layer, kv head and prompt token before the suffix: the squared distance between full's
    K/V and the cached K/V that reuse assembles (re-rotated store entries): `dk2`, `dv2`;
  - per layer and query head: the attention mass the question's tokens put on each of those
    tokens under full prefill (`mass`), so an output-driven oracle can weigh deviations by it.
This is a benchmark tool: none of it runs in a query.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.data import DEFAULT_DATA, REPO_ROOT, Question, load_questions, passage_documents
from bench.ingest import build_store

CACHE_ROOT = REPO_ROOT / ".cache" / "fidelity"
# The suffix (question and assistant opening) is far shorter than this; only these last q_proj
# rows of the full prefill are kept while it runs.
MAX_SUFFIX_ROWS = 256


def reference_path(root: Path, question_id: str) -> Path:
    return root / f"{question_id}.pt"


@torch.inference_mode()
def compute_reference(pipe, q: Question, max_new_tokens: int = 32) -> dict:
    """Full's answer, reference log-probs and the per-token oracle statistics of one question."""
    from bench.run import forced_ids
    from chunkcache.rope import apply_rope

    lm = pipe.rt.lm
    layers = lm.hf_model.model.layers
    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def keep_last_rows(_module, _inputs, output):
            rows = output.reshape(-1, output.shape[-1])  # [tokens, q_heads * head_dim]
            if index not in captured and rows.shape[0] > 1:
                captured[index] = rows[-MAX_SUFFIX_ROWS:].detach().clone()
        return keep_last_rows

    handles = [layer.self_attn.q_proj.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        req = pipe._request(q.question, None, list(q.documents), "full", None, max_new_tokens, 0.0, 1.0, 0, None,
                            None)
        full = pipe._prepare(req)
    finally:
        for h in handles:
            h.remove()
    steps: list[torch.Tensor] = []
    answer = [e for e in pipe._decode(req, full, step_logits=steps) if not isinstance(e, str)][0]
    forced = forced_ids(answer, lm, max_new_tokens)
    reference = torch.log_softmax(torch.stack(steps[:len(forced)]).float(), dim=-1)

    layout = full.layout
    n_ctx, ns = layout.suffix_start, layout.suffix_len
    reuse = pipe._prepare(pipe._request(q.question, None, list(q.documents), "reuse", None, 1, 0.0, 1.0, 0, None,
                                        None))
    full_k, full_v = full.cache.k[:, :, :n_ctx].float(), full.cache.v[:, :, :n_ctx].float()
    dk2 = (full_k - reuse.cache.k[:, :, :n_ctx].float()).pow(2).sum(-1)  # [layers, kv_heads, n_ctx]
    dv2 = (full_v - reuse.cache.v[:, :, :n_ctx].float()).pow(2).sum(-1)

    positions = torch.arange(layout.suffix_start, layout.num_tokens, device=lm.device)
    tables = lm.parts.rotary_tables(positions, torch.float32)
    masses = []
    for index, layer in enumerate(layers):
        qs = captured[index][-ns:].float().view(ns, lm.num_q_heads, lm.head_dim).transpose(0, 1)
        if lm.ropes[index].inv_freq is not None:
            qs = apply_rope(qs, *(t[0] for t in tables[lm.parts.rope_keys[index]]))  # [q_heads, ns, D]
        keys = full.cache.k[index, :, :layout.num_tokens].float()
        keys = keys.repeat_interleave(lm.num_q_heads // lm.num_kv_heads, dim=0)
        scores = qs @ keys.transpose(1, 2) * layer.self_attn.scaling
        causal = torch.arange(layout.num_tokens, device=lm.device)[None, :] <= positions[:, None]
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        masses.append(weights[..., :n_ctx].sum(dim=1))  # [q_heads, n_ctx]
    return {
        "id": q.id, "forced_ids": forced, "full_answer": answer.text, "reference": reference,
        "prefix_len": layout.prefix_len, "chunk_lens": list(layout.chunk_lens), "suffix_len": ns,
        "dk2": dk2.half(), "dv2": dv2.half(), "mass": torch.stack(masses).half(),
        "full_prefill_s": full.timings.prefill_s,
    }


def load_reference(root: Path, question_id: str) -> dict:
    return torch.load(reference_path(root, question_id), weights_only=True)


def ensure_references(pipe, questions: list[Question], root: Path, max_new_tokens: int = 32,
                      progress: bool = True) -> list[dict]:
    """Every question's reference, computed where not yet cached under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for number, q in enumerate(questions):
        path = reference_path(root, q.id)
        if not path.exists():
            started = time.perf_counter()
            ref = compute_reference(pipe, q, max_new_tokens)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # another process may be filling the same cache
            torch.save(ref, tmp)
            tmp.replace(path)
            if progress:
                print(f"[{number + 1}/{len(questions)}] {q.id}: {sum(ref['chunk_lens'])} chunk tokens, "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
        out.append(load_reference(root, q.id))
    return out


def open_bench_pipeline(model: str = "default", threads: int | None = None, kv_dtype: str = "float16",
                        store: Path | None = None, questions: list[Question] | None = None, data: Path = DEFAULT_DATA,
                        chunk_context: str | None = None):
    """The benchmark's pipeline over its store (built for `questions` if needed); `chunk_context` None: the
    config's default recipe."""
    from bench.run import BenchConfig
    from chunkcache import RAGPipeline

    cfg = BenchConfig(model=model, threads=threads, kv_dtype=kv_dtype, store=store)
    if chunk_context is not None:
        cfg = replace(cfg, chunk_context=chunk_context)
    overrides = {"kv_dtype": kv_dtype, "chunk_context": cfg.chunk_context, **({"threads": threads} if threads else {})}
    pipe = RAGPipeline.open(cfg.store_dir(), model=model, **overrides)
    if questions:
        build_store(pipe, passage_documents(questions, Path(data).stem), progress=False)
    return pipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    questions = load_questions(a.data, a.limit)
    pipe = open_bench_pipeline(a.model, a.threads, questions=questions, data=a.data)
    try:
        ensure_references(pipe, questions, CACHE_ROOT / pipe.rt.lm.fingerprint[:16], a.max_new_tokens)
    finally:
        pipe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
