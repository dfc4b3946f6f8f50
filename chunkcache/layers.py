"""The transformers side of the layer loop: a decoder's own modules, driven one layer at a time.

`forward.forward_tokens` calls each Hugging Face decoder layer itself, so every architecture's own
projections, q/k norms, RoPE (or none), multipliers, MLP and residuals run exactly as transformers
wrote them. A layer delegates two things, and chunkcache supplies both:
- the KV cache: `forward.RowPass`, a `transformers.Cache` that writes a layer's new rows at their
  positions in the request cache and hands back the layer's rows;
- the attention function, registered with transformers' `AttentionInterface` as "chunkcache": it
  hands the call to that same RowPass (position-causal attention, sliding windows, the chunk
  scale), and when the model runs outside chunkcache (transformers' own forward or generate) it is
  plain SDPA, or eager attention where logits are soft-capped.
What a `*Model.forward` does around the layers (embedding multiplier, one rotary table per layer
type, final norm, logit scaling and soft-capping) is `DecoderParts`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

ATTENTION_NAME = "chunkcache"
ROWS_KWARG = "chunkcache_rows"  # how a RowPass reaches the attention function through a layer's **kwargs

# Decoder families checked layer by layer against transformers' own forward (tests/test_architectures.py).
# Others may share their layout, but nothing unchecked is served.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
                         "granite", "smollm3")


class UnsupportedModelError(RuntimeError):
    """The model's layout cannot be driven exactly; the message names the reason."""


@dataclass
class DecoderParts:
    """The modules and constants around a causal LM's decoder layers."""

    model: torch.nn.Module  # the inner *Model: embed_tokens, layers, norm, rotary_emb
    lm_head: torch.nn.Module
    layers: list[torch.nn.Module]
    rope_keys: list[str | None]  # per layer: the rotary table it takes (its layer type), None if shared
    embedding_multiplier: float = 1.0  # Granite
    logits_scaling: float = 1.0  # Granite divides the logits
    final_softcap: float | None = None  # Gemma 2/3 cap the logits with tanh

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """int64 [n] -> [1, n, hidden] (Gemma's sqrt(hidden) scale lives in its embedding module)."""
        h = self.model.embed_tokens(token_ids[None])
        return h * self.embedding_multiplier if self.embedding_multiplier != 1.0 else h

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        """positions int64 [n] -> {rope key: (cos, sin) [1, n, rotary_dim]}, one per layer type."""
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        rotary = self.model.rotary_emb
        return {key: (rotary(probe, positions[None], key) if key is not None else rotary(probe, positions[None]))
                for key in set(self.rope_keys)}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[n, hidden] last hidden states -> fp32 [n, vocab]."""
        logits = self.lm_head(self.model.norm(h)).float()
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def check_architecture(hf_config) -> None:
    model_type = getattr(hf_config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: chunkcache drives each decoder layer of a model "
            f"family only once its exactness checks pass (full prefill equal to transformers' own forward, "
            f"cached keys re-rotated per layer); supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")


def decoder_parts(hf_model) -> DecoderParts:
    """Find the decoder's parts and bind transformers' layers to chunkcache's attention."""
    check_architecture(hf_model.config)
    model, cfg = hf_model.model, hf_model.config
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(model, name):
            raise UnsupportedModelError(f"{type(model).__name__} has no `{name}`; chunkcache drives decoders "
                                        f"laid out as embed_tokens, layers, norm and rotary_emb")
    rotary_takes_type = "layer_type" in inspect.signature(model.rotary_emb.forward).parameters
    layer_types = getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers
    use_chunkcache_attention(hf_model)
    return DecoderParts(
        model=model, lm_head=hf_model.lm_head, layers=list(model.layers),
        rope_keys=[t if rotary_takes_type else None for t in layer_types],
        embedding_multiplier=float(getattr(cfg, "embedding_multiplier", None) or 1.0),
        logits_scaling=float(getattr(cfg, "logits_scaling", None) or 1.0),
        final_softcap=getattr(cfg, "final_logit_softcapping", None))


def use_chunkcache_attention(hf_model) -> None:
    """Register the "chunkcache" attention (once per process) and select it for this model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, chunkcache_attention)
        # transformers' own forward builds this mask for the fallback below: an additive float mask,
        # which both SDPA and eager attention take.
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)
    hf_model.set_attn_implementation(ATTENTION_NAME)


def chunkcache_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, sliding_window: int | None = None,
                         softcap: float | None = None, **kwargs):
    """transformers' attention-function contract: query [1, q_heads, n, D], key/value [1, kv_heads, N, D]
    -> ([1, n, q_heads, D], None)."""
    rows = kwargs.pop(ROWS_KWARG, None)
    if rows is not None:
        return rows.attend(module.layer_idx, query, scaling, sliding_window, softcap), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap is not None:
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

        return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       softcap=softcap, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)
