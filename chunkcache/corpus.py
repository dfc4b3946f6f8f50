"""Reading a corpus from files and directories.

Supported: plain text (.txt .text .md .markdown .rst) and JSON Lines (.jsonl .ndjson) with one
document per line in a "text" field (a "title" field, when present, is put in front). Binary,
undecodable or unsupported files are skipped and counted, never fatal.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES


class CorpusError(ValueError):
    pass


@dataclass(frozen=True)
class Document:
    source: str  # resolved path, with "#L<n>" for a JSONL line
    text: str
    digest: str  # content hash, to tell a changed file from an unchanged one


@dataclass
class CorpusScan:
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why


def scan_paths(paths) -> CorpusScan:
    """Expand files and directories (recursively, sorted, hidden entries skipped).

    A path that does not exist is an error (nothing is ingested); an unsupported file is skipped.
    """
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise CorpusError(f"no such file or directory: {', '.join(missing)}")
    scan = CorpusScan()
    for p in map(Path, paths):
        candidates = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in candidates:
            rel = q.relative_to(p) if p.is_dir() else q
            if any(part.startswith(".") for part in rel.parts if part not in (".", "..")):
                continue
            if q.suffix.lower() in SUPPORTED_SUFFIXES:
                scan.files.append(q.resolve())
            else:
                scan.skipped[str(q)] = f"unsupported type {q.suffix or '(none)'} (supported: {' '.join(SUPPORTED_SUFFIXES)})"
    return scan


def read_documents(path: Path) -> list[Document]:
    """Documents of one file; raises CorpusError (caller skips the file) if it is binary or unreadable."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"unreadable: {exc.strerror or exc}") from exc
    if b"\x00" in raw[:8192]:
        raise CorpusError("binary file (NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if path.suffix.lower() in JSONL_SUFFIXES:
        return list(_jsonl_documents(path, text))
    return [Document(str(path), text, _digest(text))] if text.strip() else []


def _jsonl_documents(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"line {number} is not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"line {number} has no string field 'text'")
        body = record["text"]
        if isinstance(record.get("title"), str) and record["title"].strip():
            body = f"{record['title'].strip()}\n{body}"
        if body.strip():
            yield Document(f"{path}#L{number}", body, _digest(body))


def file_digest(path: Path) -> str:
    return _digest(path.read_bytes())


def _digest(data) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).hexdigest()
