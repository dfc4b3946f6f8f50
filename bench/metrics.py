"""Pure metric functions of the RAG benchmark: answer F1 (SQuAD/MuSiQue style), fidelity to full
prefill (KL, top-1 agreement) and the summary statistics of timings."""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles (a/an/the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 of two normalized answers; 1.0 when both normalize to nothing."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_f1(prediction: str, golds: Sequence[str]) -> float:
    """MuSiQue answer F1: the best token F1 over the gold answer and its aliases."""
    if not golds:
        raise ValueError("a question needs at least one gold answer")
    return max(token_f1(prediction, gold) for gold in golds)


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """How close a mode's next-token distributions are to full prefill's, position by position.

    Args:
        reference, candidate: fp32 log-probabilities [positions, vocab] along the same forced tokens.

    Returns:
        kl: KL(reference || candidate) per position (list of floats), kl_mean, kl_first (position 0,
        the first answer token), top1: share of positions whose argmax agrees, top1_positions (0/1 list).
    """
    if reference.shape != candidate.shape or reference.dim() != 2 or reference.shape[0] == 0:
        raise ValueError(f"need two [positions, vocab] log-prob tensors of one shape (positions >= 1), got "
                         f"{tuple(reference.shape)} and {tuple(candidate.shape)}")
    reference, candidate = reference.float(), candidate.float()
    kl = (reference.exp() * (reference - candidate)).sum(dim=-1)  # [positions]
    agree = (reference.argmax(dim=-1) == candidate.argmax(dim=-1)).int()  # [positions]
    return {"kl": kl.tolist(), "kl_mean": float(kl.mean()), "kl_first": float(kl[0]),
            "top1": float(agree.float().mean()), "top1_positions": agree.tolist()}


def median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def p90(values: Sequence[float]) -> float:
    return float(np.percentile(values, 90)) if len(values) else float("nan")


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
