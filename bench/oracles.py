"""Selection oracles: what blend would pick if it knew full prefill's KV (benchmark only).

They bound how much any token-selection policy can buy (issue: "find the headroom"). Both read
the per-token statistics that `bench.reference` saved from one full prefill:
  oracle     the true K+V deviation of each cached token from full, summed over the layers after
             the check layer (those are the layers where an unselected token keeps its stale KV);
  oracleout  output-driven: the attention mass full prefill's question puts on the token, times
             the distance of its cached V from full's, summed over those layers and every head
             (a first-order measure of how far the token's stale KV moves the question's output).
"""
from __future__ import annotations

import torch

ORACLES = ("oracle", "oracleout")


def oracle_scores(ref: dict, kind: str, check_layer: int) -> torch.Tensor:
    """fp32 [prompt tokens] per position (the suffix scores 0: it is always recomputed)."""
    after = slice(check_layer + 1, None)
    if kind == "oracle":
        scores = (ref["dk2"].float() + ref["dv2"].float())[after].sum(dim=(0, 1))
    elif kind == "oracleout":
        mass, dv2 = ref["mass"].float(), ref["dv2"].float()
        dv = dv2.sqrt().repeat_interleave(mass.shape[1] // dv2.shape[1], dim=1)  # per query head
        scores = (mass * dv)[after].sum(dim=(0, 1))
    else:
        raise ValueError(f"unknown oracle {kind!r}; use one of {', '.join(ORACLES)}")
    return torch.cat((scores, torch.zeros(ref["suffix_len"])))
