"""Reading a corpus from files and directories.

Supported: plain text (.txt .text .md .markdown .rst) and JSON Lines (.jsonl .ndjson) with one
document per line in a "text" field (a "title" field, when present, is put in front).

Only regular files are read. FIFOs, devices, sockets and links to them are refused before they are
opened (a FIFO would block ingest forever, a link to /dev/zero would read until memory runs out).
Every path that should have been read but was not (unreadable, symlink loop, broken link, too large,
binary, not UTF-8) and every bad JSONL line is reported in `skipped`, which makes `chunkcache ingest`
exit nonzero; files of unsupported types are merely `ignored`. A JSONL file keeps its good lines.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
# A corpus file beyond this is almost surely not prose meant for retrieval, and reading it whole would
# hold it all in memory at once.
MAX_FILE_BYTES = 64 * 1024 * 1024


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
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it could not be read (an error)
    ignored: dict[str, str] = field(default_factory=dict)  # path -> why it was left out (unsupported type)


@dataclass
class FileDocuments:
    documents: list[Document]
    bad_lines: dict[str, str] = field(default_factory=dict)  # "path#L<n>" -> why that JSONL line was skipped


def scan_paths(paths, *, max_file_bytes: int = MAX_FILE_BYTES) -> CorpusScan:
    """Expand files and directories (recursively, sorted, hidden entries left out).

    A path that does not exist is an error (nothing is ingested). Links are followed, to files and to
    directories, each directory once; a link back into its own ancestry is a loop and is skipped.
    """
    missing = [str(p) for p in paths if not os.path.lexists(p)]
    if missing:
        raise CorpusError(f"no such file or directory: {', '.join(missing)}")
    scan = CorpusScan()
    for p in map(Path, paths):
        _visit(p, scan, max_file_bytes, visited={}, ancestors=())
    return scan


def _visit(path: Path, scan: CorpusScan, max_file_bytes: int, visited: dict, ancestors: tuple) -> None:
    try:
        st = os.stat(path)  # follows links: what would be read
    except OSError as exc:
        scan.skipped[str(path)] = _stat_error(path, exc)
        return
    if stat.S_ISDIR(st.st_mode):
        _visit_dir(path, st, scan, max_file_bytes, visited, ancestors)
    elif not stat.S_ISREG(st.st_mode):
        scan.skipped[str(path)] = f"not a regular file ({file_kind(st.st_mode)}); only regular files are read"
    elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
        scan.ignored[str(path)] = f"unsupported type {path.suffix or '(none)'}"
    elif st.st_size > max_file_bytes:
        scan.skipped[str(path)] = f"too large ({st.st_size} bytes; the limit is {max_file_bytes})"
    else:
        scan.files.append(path.resolve())


def _visit_dir(path: Path, st: os.stat_result, scan: CorpusScan, max_file_bytes: int, visited: dict,
               ancestors: tuple) -> None:
    ident = (st.st_dev, st.st_ino)
    if ident in ancestors:
        scan.skipped[str(path)] = f"symlink loop: {path} leads back to {visited[ident]}, which contains it"
        return
    if ident in visited:
        scan.ignored[str(path)] = f"the same directory as {visited[ident]}, read once"
        return
    visited[ident] = path
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        scan.skipped[str(path)] = f"unreadable directory: {exc.strerror or exc}"
        return
    for name in names:
        if not name.startswith("."):
            _visit(path / name, scan, max_file_bytes, visited, ancestors + (ident,))


def _stat_error(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop (the link resolves to itself)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"broken symbolic link to {os.readlink(path)}"
    return f"unreadable: {exc.strerror or exc}"


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def read_documents(path: Path, *, max_file_bytes: int = MAX_FILE_BYTES) -> FileDocuments:
    """Documents of one file; raises CorpusError (the caller skips the file) if it cannot be read as text.

    The file is checked again once open (O_NONBLOCK, so even a FIFO swapped in since the scan cannot
    block): only a regular file within the size limit is read.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CorpusError(f"not a regular file ({file_kind(st.st_mode)}); only regular files are read")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CorpusError(f"not a regular file ({file_kind(st.st_mode)}); only regular files are read")
            raw = f.read(max_file_bytes + 1)
    except OSError as exc:
        raise CorpusError(f"unreadable: {exc.strerror or exc}") from exc
    if len(raw) > max_file_bytes:
        raise CorpusError(f"too large (over {max_file_bytes} bytes, the limit)")
    if b"\x00" in raw[:8192]:
        raise CorpusError("binary file (NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _jsonl_documents(path, text)
    return FileDocuments([Document(str(path), text, content_digest(text))] if text.strip() else [])


def _jsonl_documents(path: Path, text: str) -> FileDocuments:
    """Every good line is a document; a bad line is reported and the others are kept."""
    out = FileDocuments([])
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}#L{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            out.bad_lines[where] = f"not JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            out.bad_lines[where] = "no string field 'text'"
            continue
        body = record["text"]
        if isinstance(record.get("title"), str) and record["title"].strip():
            body = f"{record['title'].strip()}\n{body}"
        if body.strip():
            out.documents.append(Document(where, body, content_digest(body)))
    return out


def content_digest(data) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).hexdigest()
