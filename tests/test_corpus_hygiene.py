"""Ingest input hygiene (issue 9, item 7): only regular files are read, every skipped path is reported and
makes `chunkcache ingest` exit nonzero, and a JSONL file keeps its good lines."""
from __future__ import annotations

import json
import os
import threading

import pytest

from chunkcache import cli
from chunkcache.corpus import CorpusError, read_documents, scan_paths

from .conftest import DOCS


def scanned(root, **kw):
    scan = scan_paths([root], **kw)
    return [p.name for p in scan.files], scan.skipped, scan.ignored


def test_fifo_and_links_to_devices_are_refused_without_opening_them(tmp_path):
    (tmp_path / "good.txt").write_text(DOCS[0])
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    (tmp_path / "fifo-link.md").symlink_to(tmp_path / "pipe.txt")
    # A scan that opened the FIFO would block here forever: run it with a deadline.
    result = {}
    worker = threading.Thread(target=lambda: result.update(scan=scanned(tmp_path)), daemon=True)
    worker.start()
    worker.join(10)
    assert "scan" in result, "scanning a directory with a FIFO blocked"
    files, skipped, _ = result["scan"]
    assert files == ["good.txt"]
    assert skipped[str(tmp_path / "pipe.txt")].startswith("not a regular file (a FIFO)")
    assert skipped[str(tmp_path / "fifo-link.md")].startswith("not a regular file (a FIFO)")
    assert skipped[str(tmp_path / "zero.txt")].startswith("not a regular file (a character device)")


def test_read_documents_refuses_a_fifo_even_if_swapped_in_after_the_scan(tmp_path):
    os.mkfifo(tmp_path / "late.txt")
    with pytest.raises(CorpusError, match="a FIFO"):
        read_documents(tmp_path / "late.txt")


def test_loops_broken_links_and_unreadable_directories_are_reported(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text(DOCS[0])
    (root / "sub" / "up").symlink_to(root)  # a loop through a directory link
    (root / "self.txt").symlink_to(root / "self.txt")  # a link to itself
    (root / "gone.txt").symlink_to(tmp_path / "missing.txt")
    (root / "zz-same").symlink_to(root / "sub")  # another way into sub (listed after it): read once, no error
    locked = root / "locked"
    locked.mkdir()
    (locked / "secret.txt").write_text("x")
    listdir = os.listdir

    def denied(path):
        # chmod 0 does not stop root (the test may run as root): refuse the listing itself.
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", denied)
    files, skipped, ignored = scanned(root)
    assert files == ["a.txt"]
    assert skipped.pop(str(locked)) == "unreadable directory: Permission denied"
    assert skipped.pop(str(root / "sub" / "up")).startswith("symlink loop")
    assert skipped.pop(str(root / "self.txt")).startswith("symlink loop")
    assert skipped.pop(str(root / "gone.txt")).startswith("broken symbolic link")
    assert skipped == {}
    assert ignored[str(root / "zz-same")] == f"the same directory as {root / 'sub'}, read once"


def test_too_large_files_are_skipped(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 2000)
    _, skipped, _ = scanned(tmp_path, max_file_bytes=1000)
    assert skipped[str(tmp_path / "big.txt")] == "too large (2000 bytes; the limit is 1000)"
    with pytest.raises(CorpusError, match="too large"):
        read_documents(tmp_path / "big.txt", max_file_bytes=1000)


def test_jsonl_keeps_its_good_lines_and_reports_the_bad_ones(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps({"text": DOCS[0]}), "{not json", json.dumps({"title": "no text"}),
                               "", json.dumps({"text": DOCS[1]})]) + "\n")
    read = read_documents(path)
    assert [d.text for d in read.documents] == DOCS[:2]
    assert [d.source for d in read.documents] == [f"{path}#L1", f"{path}#L5"]
    assert read.bad_lines[f"{path}#L2"].startswith("not JSON")
    assert read.bad_lines[f"{path}#L3"] == "no string field 'text'"
    assert len(read.bad_lines) == 2


def test_ingest_summary_and_exit_status_report_every_skip(tmp_path, tiny_lm, hash_embedder, monkeypatch, capsys):
    from chunkcache import RAGPipeline

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text(DOCS[0])
    (corpus / "lines.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n[1, 2]\n")
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (corpus / "notes.pdf").write_bytes(b"%PDF")
    os.mkfifo(corpus / "pipe.txt")
    opened, original_open = [], RAGPipeline.open

    def open_tiny(store, **overrides):
        pipe = original_open(store, lm=tiny_lm, embedder=hash_embedder, kv_dtype="float32", chunk_tokens=48)
        opened.append(pipe)
        return pipe

    monkeypatch.setattr(RAGPipeline, "open", staticmethod(open_tiny))
    try:
        status = cli.main(["ingest", str(corpus), "--store", str(tmp_path / "store"), "--no-progress"])
    finally:
        for pipe in opened:
            pipe.close()
    out, err = capsys.readouterr()
    assert status == 1 and "3 path(s) or line(s) skipped" in err, err
    assert "files: 2 read, 0 unchanged, 3 skipped, 1 ignored" in out and "chunks: 2 (2 computed" in out
    assert f"skipped {corpus / 'pipe.txt'}: not a regular file (a FIFO)" in out
    assert f"skipped {corpus / 'lines.jsonl'}#L2: no string field 'text'" in out
    assert "latin1.txt: not UTF-8 text" in out and "1 .pdf" in out
