"""Which RoPE variants chunkcache can re-rotate, per layer, and the load-time self-test that proves it.

Cached keys are stored after RoPE at the positions they were computed at and rotated by the
position delta when reused (blend_kernels.rerotate_keys). That is exact when the rotation angle is
linear in the position: default, linear, llama3 and YaRN RoPE (YaRN's constant cos/sin factor is
already in the cached key and a rotation keeps it). Each layer has its own: Gemma 3's local and
global layers use different bases, Phi-style partial rotary turns only the leading dims, and
SmolLM3's NoPE layers turn nothing, so their cached keys must not move. Dynamic NTK changes its
frequencies with the sequence length and LongRoPE switches factor sets at a length threshold, so a
rotation by the delta would not equal computing at the target position: refuse them, and M-RoPE,
whose positions are not one number.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COMPOSABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
WHY_NOT = {
    "dynamic": "dynamic NTK scaling changes its frequencies with the sequence length",
    "longrope": "LongRoPE switches between its short and long factors at a length threshold",
}
SELF_TEST_TOLERANCE = 1e-4


class UnsupportedRopeError(RuntimeError):
    pass


@dataclass(frozen=True, eq=False)
class LayerRope:
    """How one layer's cached keys move to a new position."""

    inv_freq: torch.Tensor | None  # fp32 [rotary_dim // 2]; None: the layer applies no RoPE (NoPE)

    @property
    def rotary_dim(self) -> int:
        return 0 if self.inv_freq is None else 2 * self.inv_freq.shape[0]


def rope_parameter_sets(hf_config) -> list[dict]:
    """The config's RoPE parameter dicts: one, or one per layer type (Gemma 3)."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    nested = [v for v in params.values() if isinstance(v, dict)]
    return nested or [params]


def rope_type_of(params: dict) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def check_rope_supported(hf_config) -> None:
    for params in rope_parameter_sets(hf_config):
        rope_type = rope_type_of(params)
        if "mrope_section" in params or rope_type == "mrope":
            raise UnsupportedRopeError("M-RoPE positions are (time, height, width) triples, not one number a "
                                       "cached key can be moved by; models with M-RoPE are not supported")
        if rope_type not in COMPOSABLE_ROPE_TYPES:
            why = WHY_NOT.get(rope_type, "it is not known to compose")
            raise UnsupportedRopeError(
                f"RoPE type {rope_type!r} cannot be re-rotated ({why}): rotating cached keys by a position delta "
                f"would not equal computing them at the new position, so cached chunks cannot be reused with this "
                f"model. Supported RoPE types: {', '.join(COMPOSABLE_ROPE_TYPES)}.")


def layer_ropes(parts, device: torch.device) -> list[LayerRope]:
    """One LayerRope per decoder layer; layers of one type share one object (see rerotate_layers)."""
    rotary = parts.model.rotary_emb
    shared: dict = {}
    no_rope = LayerRope(None)
    ropes = []
    for layer, key in zip(parts.layers, parts.rope_keys):
        if not getattr(layer.self_attn, "use_rope", True):
            ropes.append(no_rope)
            continue
        if key not in shared:
            inv_freq = getattr(rotary, f"{key}_inv_freq") if key is not None else rotary.inv_freq
            shared[key] = LayerRope(inv_freq.detach().to(device=device, dtype=torch.float32))
        ropes.append(shared[key])
    return ropes


def rerotate_layers(keys: torch.Tensor, deltas: torch.Tensor, ropes: list[LayerRope], *,
                    out: torch.Tensor) -> torch.Tensor:
    """keys, out: [layers, kv_heads, tokens, head_dim]; deltas: int [tokens]. Each layer's keys move by its
    own RoPE: one kernel call per run of consecutive layers that share one (one call for most models)."""
    from blend_kernels import rerotate_keys

    start = 0
    while start < len(ropes):
        end = start + 1
        while end < len(ropes) and ropes[end] is ropes[start]:
            end += 1
        rot = ropes[start].rotary_dim
        if rot:
            rerotate_keys(keys[start:end, ..., :rot], deltas, ropes[start].inv_freq, out=out[start:end, ..., :rot])
        if rot < keys.shape[-1] and out.data_ptr() != keys.data_ptr():
            out[start:end, ..., rot:].copy_(keys[start:end, ..., rot:])
        start = end
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, tokens, head_dim]; cos, sin: [tokens, rotary_dim] (HF rotate_half convention on the
    leading rotary_dim dims; the rest pass through)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def rope_self_test(parts, ropes: list[LayerRope], hf_config, *, seed: int = 0) -> float:
    """Keys rotated from positions a to b must equal keys computed at b with each layer's own RoPE.

    Runs at every model load (a few milliseconds of work); returns the max abs error.
    LMCache's users met "garbled output" when a model's RoPE differed from what the cache assumed.
    """
    from blend_kernels import rerotate_keys

    max_pos = int(getattr(hf_config, "max_position_embeddings", 2048))
    worst = 0.0
    tested: set[int] = set()
    for key, rope in zip(parts.rope_keys, ropes):
        if rope.inv_freq is None or id(rope) in tested:
            continue
        tested.add(id(rope))
        device = rope.inv_freq.device
        x = torch.randn(2, 8, rope.rotary_dim, generator=torch.Generator().manual_seed(seed)).to(device)
        for a, b in ((0, 7), (5, 1), (3, max(0, max_pos - 16))):
            pos_a = torch.arange(a, a + 8, device=device)
            pos_b = torch.arange(b, b + 8, device=device)
            ka = apply_rope(x, *(t[0] for t in parts.rotary_tables(pos_a, torch.float32)[key]))
            kb = apply_rope(x, *(t[0] for t in parts.rotary_tables(pos_b, torch.float32)[key]))
            moved = rerotate_keys(ka, pos_b - pos_a, rope.inv_freq)
            worst = max(worst, (moved - kb).abs().max().item())
        # transformers computes angles as position * inv_freq in fp32, so near the end of a long context
        # its own keys carry an angle error of about an ulp of the position: allow for two.
        angle_error = 2 * torch.finfo(torch.float32).eps * max_pos
        if worst > (SELF_TEST_TOLERANCE + angle_error) * max(1.0, x.abs().max().item()):
            raise UnsupportedRopeError(
                f"RoPE self-test failed: keys re-rotated to new positions differ from keys computed there by "
                f"{worst:.3g} (layer type {key!r}); this model's RoPE cannot be reused from cache.")
    return worst
