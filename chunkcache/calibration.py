"""Per-model constants fitted offline (`python -m bench.calibrate`), shipped as small JSON files.

A calibration holds log(S) for the attention scale on reused chunks (see `blend.chunk_key_bias`):
[layers, 1 or q_heads], fitted for reuse (`bench.calibrate`), and optionally one S for blend
(`blend_log_scale`, `bench.calibrate_blend`): once blend recomputes the tokens the question reads
most, the stale rows left are another population, and a smaller uniform S fits them better than
reuse's table. It is keyed by the model's weights and architecture, not its compute dtype, so the
same file serves fp32 on CPU and bf16 on a GPU. A context-enriched chunk (chunkcache/context.py) lost less
of its context, so it takes its own uniform S per recipe (`context_log_scale`,
`bench.calibrate_blend --chunk-context neighbour`). A model without a file gets no correction (S = 1): a
scale fitted on one model says nothing about another.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

CALIBRATION_DIR = Path(__file__).parent / "calibrations"
FORMAT = "chunkcache-calibration"


def calibration_path(calibration_id: str) -> Path:
    return CALIBRATION_DIR / f"{calibration_id[:16]}.json"


def write_calibration(lm, log_scale: torch.Tensor, report: dict) -> Path:
    """Write `log_scale` [layers, 1 or q_heads] for `lm` with the fit's report beside it."""
    if log_scale.shape[0] != lm.num_layers or log_scale.shape[1] not in (1, lm.num_q_heads):
        raise ValueError(f"log_scale {list(log_scale.shape)} must be [layers={lm.num_layers}, 1 or "
                         f"q_heads={lm.num_q_heads}]")
    path = calibration_path(lm.calibration_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "version": 1, "model": lm.spec, "calibration_id": lm.calibration_id,
            "layers": lm.num_layers, "q_heads": lm.num_q_heads,
            "chunk_log_scale": [[round(x, 5) for x in row] for row in log_scale.tolist()], "fit": report}
    path.write_text(json.dumps(body, indent=1) + "\n")
    load_chunk_log_scale.cache_clear()
    return path


def write_blend_scale(lm, scale: float, report: dict) -> Path:
    """Add blend's uniform S to `lm`'s calibration file (which `write_calibration` made first)."""
    def add(body: dict) -> None:
        body["blend_log_scale"] = round(math.log(scale), 5)
        body["blend_fit"] = report

    path = _add_uniform_scale(lm, "blend", scale, add)
    load_blend_log_scale.cache_clear()
    return path


def write_context_scale(lm, recipe: str, scale: float, report: dict) -> Path:
    """Add the uniform S of chunks enriched by `recipe` (a chunk_context) to `lm`'s calibration file."""
    def add(body: dict) -> None:
        body.setdefault("context_log_scale", {})[recipe] = round(math.log(scale), 5)
        body.setdefault("context_fit", {})[recipe] = report

    path = _add_uniform_scale(lm, "context", scale, add)
    load_context_log_scale.cache_clear()
    return path


def _add_uniform_scale(lm, what: str, scale: float, add) -> Path:
    """Check `scale`, then let `add` put it into `lm`'s calibration file (which `write_calibration` made)."""
    path = calibration_path(lm.calibration_id)
    if not path.exists():
        raise ValueError(f"{lm.spec} has no calibration file yet; fit reuse's first: python -m bench.calibrate")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"{what} scale must be in (0, 1], got {scale}")
    body = json.loads(path.read_text())
    add(body)
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


@functools.lru_cache(maxsize=16)
def load_context_log_scale(calibration_id: str, recipe: str) -> float | None:
    """log(S) fitted for chunks enriched by `recipe` (every layer, every mode), or None when there is none."""
    path = calibration_path(calibration_id)
    if not path.exists():
        return None
    body = json.loads(path.read_text())
    if body.get("calibration_id") != calibration_id:
        return None
    return body.get("context_log_scale", {}).get(recipe)


@functools.lru_cache(maxsize=16)
def load_blend_log_scale(calibration_id: str) -> float | None:
    """log(S) fitted for blend (one value, every layer), or None when the model's file has none."""
    path = calibration_path(calibration_id)
    if not path.exists():
        return None
    body = json.loads(path.read_text())
    return body.get("blend_log_scale") if body.get("calibration_id") == calibration_id else None


@functools.lru_cache(maxsize=16)
def load_chunk_log_scale(calibration_id: str, layers: int, q_heads: int) -> torch.Tensor | None:
    """fp32 [layers, 1 or q_heads] log(S) fitted for this model, or None when it has no calibration."""
    path = calibration_path(calibration_id)
    if not path.exists():
        return None
    body = json.loads(path.read_text())
    table = torch.tensor(body["chunk_log_scale"], dtype=torch.float32)
    if body.get("calibration_id") != calibration_id or table.shape[0] != layers or table.shape[1] not in (1, q_heads):
        raise ValueError(f"calibration {path} does not fit this model ({layers} layers, {q_heads} heads); "
                         "delete it or refit with `python -m bench.calibrate`")
    return table
