"""Packaging: imports point one way, and a caller's folders cannot shadow the project's packages."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved), wherever in the file."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_dependencies_point_one_way():
    """bench -> chunkcache -> (store, retriever, blend_kernels); nothing imports the CLI (the top) or bench."""
    offenders = []
    for package in ("chunkcache", "store", "retriever", "blend_kernels"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "chunkcache" / "cli.py":
                continue
            bad = {m for m in imported_modules(path) if m.split(".")[0] == "bench" or m.startswith("chunkcache.cli")}
            if package != "chunkcache":
                bad |= {m for m in imported_modules(path) if m.split(".")[0] == "chunkcache"}
            offenders += [f"{path.relative_to(ROOT)} imports {m}" for m in sorted(bad)]
    assert not offenders, "\n".join(offenders)


def test_a_callers_folders_do_not_shadow_the_packages(tmp_path):
    """Run from a directory that has its own store/ and retriever/ (and blend_kernels/) folders."""
    for name in ("store", "retriever", "blend_kernels", "bench"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("a user's own folder")
    code = "import chunkcache.pipeline, store.kvstore, retriever, blend_kernels; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
