"""The exact configuration printed and recorded with every benchmark result."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import subprocess
from pathlib import Path

import torch

from chunkcache import openmp

REPO_ROOT = Path(__file__).resolve().parents[1]


def environment(pipe) -> dict:
    """Model, dtypes, threads, library versions, CPU and git commit of this run."""
    cfg, lm = pipe.config, pipe.rt.lm
    commit, dirty = git_state()
    return {
        "model": lm.spec, "model_fingerprint": lm.fingerprint, "compute_dtype": str(lm.dtype).removeprefix("torch."),
        "linear_dtype": lm.linear_dtype, "openmp_tuned": openmp.TUNED,
        "device": str(lm.device), "kv_dtype": cfg.kv_dtype, "check_layer": cfg.check_layer,
        "epic_tokens": cfg.epic_tokens, "num_layers": lm.num_layers, "num_kv_heads": lm.num_kv_heads,
        "head_dim": lm.head_dim, "prefix_tokens": len(pipe.rt.template.prefix_ids),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": _version("transformers"),
        "python": platform.python_version(), "cpu": cpu_name(), "platform": platform.platform(),
        "git_commit": commit, "git_dirty": dirty,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> tuple[str, bool]:
    """(HEAD commit, whether tracked files differ from it); ("unknown", False) outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def next_free_path(path: Path) -> Path:
    """`path`, or path-2, path-3, ... (before the suffix) if it exists: never overwrite a result."""
    candidate, n = path, 2
    while candidate.exists() or candidate.with_suffix(".md").exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def dump_json(obj) -> str:
    """Indented JSON with lists of numbers kept on one line (per-position figures stay readable)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\n\s*([-0-9.eE+,\s]*?)\n\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"
