"""`chunkcache ingest`: files -> chunks -> embeddings + Faiss, and chunk KVs -> LMDB.

Resumable by construction: KVs are written in small atomic batches keyed by content, a file is
marked done only once all its chunks are stored, and a re-run skips unchanged files and stored
chunks. The Faiss index is derived from the stored embeddings, so an interrupted run leaves a
store that opens (the index is rebuilt if it lags behind).

A source whose content changed, or that was removed from a directory being ingested, has its old
chunks retired: its record first lists them as "stale", then they are deleted from the store (unless
another source still holds the same text), then the list is cleared; a run interrupted in between
finishes the job on the next run.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .chunker import Chunk, split_chunks
from .context import enrich_chunks, enriched, linked_entries, plain_kv, unlinked
from .distributed import RayOptions
from .corpus import SUPPORTED_SUFFIXES, CorpusError, Document, content_digest, read_documents, scan_paths
from .kvcompute import chunk_kv, context_chunk_kv, extract_kv, prefix_cache
from .prompt import chunk_token_ids
from .runtime import Runtime

log = logging.getLogger(__name__)

WRITE_BATCH = 16  # chunks per LMDB transaction: small enough that an interrupt loses little


@dataclass
class PendingChunk:
    key: bytes
    token_ids: list[int]
    text: str
    meta: dict


@dataclass
class IngestReport:
    files: int = 0
    files_unchanged: int = 0
    # Paths (and JSONL lines, "path#L<n>") that should have been read but were not: `chunkcache ingest`
    # exits nonzero when there are any. `ignored`: files of unsupported types, not an error.
    skipped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    documents: int = 0
    chunks: int = 0
    chunks_computed: int = 0
    chunks_reused: int = 0
    chunks_retired: int = 0
    tokens_computed: int = 0
    seconds_kv: float = 0.0
    seconds_embed: float = 0.0
    seconds_total: float = 0.0
    context_entries: int = 0  # context-enriched entries computed (chunk_context "neighbour": chunkcache/context.py)
    context_tokens: int = 0  # tokens run for them: each chunk's and its neighbour's
    seconds_context: float = 0.0
    workers: int = 0  # Ray worker processes that computed chunks (0: computed here); a restarted one counts again

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_computed / self.seconds_kv if self.seconds_kv else 0.0

    def summary(self) -> str:
        lines = [f"files: {self.files} read, {self.files_unchanged} unchanged, {len(self.skipped)} skipped"
                 + (f", {len(self.ignored)} ignored" if self.ignored else ""),
                 f"chunks: {self.chunks} ({self.chunks_computed} computed, {self.chunks_reused} already stored"
                 + (f", {self.chunks_retired} retired from edited or removed files" if self.chunks_retired else "")
                 + ")",
                 f"KV compute: {self.tokens_computed} tokens in {self.seconds_kv:.1f} s "
                 f"({self.tokens_per_s:.0f} tokens/s"
                 + (f" per worker, {self.workers} Ray worker process{'es' if self.workers != 1 else ''}"
                    if self.workers else "")
                 + f"); embedding {self.seconds_embed:.1f} s; total {self.seconds_total:.1f} s"]
        if self.context_entries:
            lines.append(f"context-enriched entries: {self.context_entries} ({self.context_tokens} tokens in "
                         f"{self.seconds_context:.1f} s)")
        if self.ignored:
            kinds = Counter(Path(p).suffix or "(no suffix)" for p in self.ignored)
            lines.append(f"ignored (unsupported types; supported: {' '.join(SUPPORTED_SUFFIXES)}): "
                         + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
        lines += [f"skipped {path}: {why}" for path, why in self.skipped.items()]
        return "\n".join(lines)


# A chunker splits a document's text into chunk texts (default: chunker.split_chunks at chunk_tokens).
Chunker = Callable[[str], list[str]]


def ingest_paths(rt: Runtime, paths, *, progress: bool = True, chunker: Chunker | None = None,
                 ray: RayOptions | None = None) -> IngestReport:
    """Ingest files and directories into the runtime's store; see the module docstring. With `ray`, the
    chunks' KVs and embeddings are computed on Ray workers (chunkcache/distributed.py)."""
    started = time.perf_counter()
    scan = scan_paths(paths)
    report = IngestReport(skipped=dict(scan.skipped), ignored=dict(scan.ignored))
    todo: list[tuple[str, str, list[PendingChunk]]] = []
    retry: list[tuple[str, list[bytes]]] = []  # unchanged sources whose enriched entries are not all there
    for path in scan.files:
        try:
            read = read_documents(path)
        except CorpusError as exc:
            report.skipped[str(path)] = str(exc)
            continue
        docs = read.documents
        report.skipped.update(read.bad_lines)  # a JSONL file keeps its good lines
        report.files += 1
        report.documents += len(docs)
        digest = "|".join(d.digest for d in docs)
        if _unchanged(rt, str(path), digest, report, retry):
            continue
        todo.append((str(path), digest, [c for d in docs for c in document_chunks(rt, d, chunker)]))
    if report.files == 0 and not todo:
        raise CorpusError(f"no documents found in {', '.join(map(str, paths))}"
                          + (f" ({len(report.skipped)} file(s) skipped, see below)" if report.skipped else "")
                          + "\n" + "\n".join(f"  {p}: {w}" for p, w in report.skipped.items()))
    _store_sources(rt, todo, report, progress, on_done=lambda: _mark_removed(rt, paths, {str(f) for f in scan.files}),
                   ray=ray, retry=retry)
    report.seconds_total = time.perf_counter() - started
    return report


def ingest_texts(rt: Runtime, items, *, progress: bool = True, chunker: Chunker | None = None,
                 ray: RayOptions | None = None) -> IngestReport:
    """Ingest raw texts: strings, or dicts with "text" and optional "source" and "title" (put in front of the
    text, as in JSONL files). A text's source defaults to its content hash; re-ingesting an unchanged
    source skips it, and a changed one retires the chunks it no longer has."""
    started = time.perf_counter()
    report = IngestReport()
    todo: list[tuple[str, str, list[PendingChunk]]] = []
    retry: list[tuple[str, list[bytes]]] = []  # unchanged sources whose enriched entries are not all there
    for number, item in enumerate(items):
        doc = text_document(item, number)
        report.files += 1
        report.documents += 1
        if _unchanged(rt, doc.source, doc.digest, report, retry):
            continue
        todo.append((doc.source, doc.digest, document_chunks(rt, doc, chunker)))
    _store_sources(rt, todo, report, progress, ray=ray, retry=retry)
    report.seconds_total = time.perf_counter() - started
    return report


def text_document(item, number: int) -> Document:
    """A Document from `ingest_texts`' item `number` (a string or {"text", "source", "title"})."""
    if isinstance(item, str):
        text, source, title = item, None, None
    elif isinstance(item, dict) and isinstance(item.get("text"), str):
        text, source, title = item["text"], item.get("source"), item.get("title")
    else:
        raise ValueError(f"text {number} must be a string or a dict with a string 'text', got {type(item).__name__}")
    if isinstance(title, str) and title.strip():
        text = f"{title.strip()}\n{text}"
    if not text.strip():
        raise ValueError(f"text {number} is empty")
    digest = content_digest(text)
    return Document(str(source) if source else f"text:{digest}", text, digest)


def _unchanged(rt: Runtime, source: str, digest: str, report: IngestReport,
               retry: list[tuple[str, list[bytes]]]) -> bool:
    """Whether the source is stored as it is now (then counted as unchanged). One whose chunks are not all
    linked to an enriched entry yet (no neighbour then: the store's first document) joins `retry`."""
    record = rt.store.kv.get_source(source)
    if not (record and record.get("digest") == digest and record.get("complete")):
        return False
    report.files_unchanged += 1
    report.chunks += record.get("num_chunks", 0)
    if enriched(rt) and not record.get("enriched"):
        retry.append((source, [bytes.fromhex(k) for k in record.get("keys", [])]))
    return True


def _store_sources(rt: Runtime, todo: list[tuple[str, str, list[PendingChunk]]], report: IngestReport,
                   progress: bool, on_done: Callable[[], None] = lambda: None, ray: RayOptions | None = None,
                   retry: list[tuple[str, list[bytes]]] = ()) -> None:
    """Store every source's chunks (computing the missing KVs), record each source, retire stale chunks, then
    compute the enriched entries of these sources' chunks and of `retry`'s."""
    ensure_prefix(rt)
    missing = set(rt.store.kv.missing([c.key for _, _, chunks in todo for c in chunks]))
    bar = tqdm(total=len(missing), unit="chunk", disable=not progress, desc="ingest", dynamic_ncols=True)
    try:
        if ray is not None:
            from .distributed import compute_on_ray

            pending = list({c.key: c for _, _, chunks in todo for c in chunks if c.key in missing}.values())
            compute_on_ray(rt, pending, ray, report, bar)
            rt.store.refresh()  # the workers' chunks join the index by id, like another process's
            report.chunks_reused -= report.chunks_computed  # counted below as already stored
        for source, digest, chunks in todo:
            old = rt.store.kv.get_source(source) or {}
            stored = store_chunks(rt, chunks, report=report, bar=bar, embed=True)
            report.chunks += len(chunks)
            keys = [k.hex() for k in stored]
            stale = sorted((set(old.get("keys", [])) | set(old.get("stale", []))) - set(keys))
            rt.store.kv.put_source(source, {"digest": digest, "complete": True, "num_chunks": len(chunks),
                                            "keys": keys, **({"stale": stale} if stale else {})})
        on_done()
        report.chunks_retired = retire_stale(rt)
        if enriched(rt) and (todo or retry):
            _enrich_sources(rt, [(source, [c.key for c in chunks]) for source, _, chunks in todo] + list(retry),
                            report, bar)
    except BaseException:
        bar.close()
        # NOTE: the first error is the one to report (e.g. disk full); a failed index save must not mask it.
        try:
            rt.store.save_index()
        except Exception as exc:  # noqa: BLE001 - logged; the index is rebuilt from the store on next open
            log.warning("index not saved after the failed ingest: %s", exc)
        raise
    bar.close()
    rt.store.save_index()


def _enrich_sources(rt: Runtime, sources: list[tuple[str, list[bytes]]], report: IngestReport, bar) -> None:
    """The context-enriched entries of the sources' chunks (chunkcache/context.py). Run once every source is
    stored and indexed and the stale chunks are retired, so that each chunk's neighbour is found among all of
    today's chunks, never an edited-away version of itself. A source is marked enriched once every chunk of
    it is linked; one that is not (no neighbour yet: the store's first document) is tried again next time."""
    t = time.perf_counter()
    bar.set_description("context")
    keys = [k for _, chunk_keys in sources for k in chunk_keys]
    report.context_entries, report.context_tokens = enrich_chunks(rt, keys, bar=bar)
    report.seconds_context = time.perf_counter() - t
    # By the links, not the entries: under a size cap an entry may be evicted already, and marking by it
    # would recompute it on every later ingest (a query falls back to the plain entry instead). The records'
    # keys are read afresh: a source given twice in one run holds its last version's.
    records = {source: rt.store.kv.get_source(source) for source, _ in sources}
    records = {source: record for source, record in records.items() if record}
    left = set(unlinked(rt, [bytes.fromhex(k) for record in records.values() for k in record.get("keys", [])]))
    for source, record in records.items():
        if not left.intersection(bytes.fromhex(k) for k in record.get("keys", [])):
            rt.store.kv.put_source(source, {**record, "enriched": True})


def _mark_removed(rt: Runtime, paths, present: set[str]) -> None:
    """Mark the records of files that vanished from an ingested directory: all their chunks are stale."""
    roots = [str(Path(p).resolve()) + os.sep for p in paths if Path(p).is_dir()]
    for source, record in rt.store.kv.sources().items():
        if source in present or not any(source.startswith(r) for r in roots) or Path(source).exists():
            continue
        stale = sorted(set(record.get("keys", [])) | set(record.get("stale", [])))
        rt.store.kv.put_source(source, {"removed": True, "keys": [], "stale": stale, "num_chunks": 0})


def _chunker_pieces(doc, chunker: Chunker) -> list[Chunk]:
    """A user chunker's texts as Chunks, located in the document where they occur (else start = end = -1)."""
    texts = chunker(doc.text)
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"the chunker must return a list of strings, got {type(texts).__name__}")
    pieces, at = [], 0
    for text in (t for t in texts if t.strip()):
        start = doc.text.find(text, at)
        end = start + len(text) if start >= 0 else -1
        at = end if start >= 0 else at
        pieces.append(Chunk(text, start, end))
    return pieces


def retire_stale(rt: Runtime) -> int:
    """Delete the chunks that source records list as stale and no source still holds; returns how many.

    Every process's index drops them on its next query (`ChunkStore.refresh`).
    """
    records = rt.store.kv.sources()
    held = {k for r in records.values() for k in r.get("keys", [])}
    pending = {s: r for s, r in records.items() if r.get("stale")}
    if not pending:
        return 0
    doomed = [bytes.fromhex(k) for k in sorted({k for r in pending.values() for k in r["stale"]} - held)]
    # Their context-enriched entries go first: a run stopped in between leaves no entry without its chunk.
    rt.store.kv.delete_chunks(linked_entries(rt, doomed))
    retired = rt.store.kv.delete_chunks(doomed)
    for source, record in pending.items():
        if record.get("removed"):
            rt.store.kv.delete_source(source)
        else:
            rt.store.kv.put_source(source, {k: v for k, v in record.items() if k != "stale"})
    rt.store.refresh()
    if retired:
        log.info("retired %d chunk(s) of edited or removed sources", retired)
    return retired


def document_chunks(rt: Runtime, doc, chunker: Chunker | None = None) -> list[PendingChunk]:
    chunks = []
    pieces = split_chunks(doc.text, rt.lm.tokenizer, rt.config.chunk_tokens) if chunker is None \
        else _chunker_pieces(doc, chunker)
    for number, c in enumerate(pieces):
        ids = chunk_token_ids(rt.lm.tokenizer, c.text)
        if len(ids) > rt.lm.max_context // 2:
            raise ValueError(f"{doc.source}: chunk {number} has {len(ids)} tokens; chunks must stay under half the "
                             f"model's context ({rt.lm.max_context // 2}): make the chunker's pieces smaller")
        meta = {"source": doc.source, "chunk": number, "start": c.start, "end": c.end, "text": c.text,
                "token_ids": ids, "num_tokens": len(ids)}
        chunks.append(PendingChunk(rt.key_for(ids), ids, c.text, meta))
    return chunks


def ensure_prefix(rt: Runtime) -> None:
    key = rt.prefix_key()
    if key not in rt.store.kv:
        ids = list(rt.template.prefix_ids)
        cache = prefix_cache(rt.lm, ids, len(ids))
        rt.store.kv.put_kv(key, extract_kv(cache, 0, len(ids), rt.kv_dtype),
                           {"kind": "prefix", "num_tokens": len(ids)})


def store_chunks(rt: Runtime, chunks: list[PendingChunk], *, report: IngestReport | None = None,
                 bar=None, embed: bool = True, index: bool = True) -> list[bytes]:
    """Compute and store the KV of every chunk not yet stored; returns all the chunks' keys.

    With `embed`, the new chunks are embedded, and with `index` also added to this process's retrieval
    index (a Ray worker has none: the driver's index picks them up from the store).
    """
    report = report or IngestReport()
    missing = set(rt.store.kv.missing([c.key for c in chunks]))
    todo = list({c.key: c for c in chunks if c.key in missing}.values())
    report.chunks_reused += len(chunks) - len(todo)
    if todo:
        with rt.lock:
            longest = max(len(c.token_ids) for c in todo)
            scratch = prefix_cache(rt.lm, list(rt.template.prefix_ids), len(rt.template.prefix_ids) + longest)
            for start in range(0, len(todo), WRITE_BATCH):
                _store_batch(rt, todo[start:start + WRITE_BATCH], scratch, report, bar, embed, index)
    return [c.key for c in chunks]


def recompute_kv(rt: Runtime, chunks: list[PendingChunk]) -> None:
    """Recompute stored chunks' KVs and overwrite them (damaged entries), keeping metadata and ids."""
    if not chunks:
        return
    prefix_len = len(rt.template.prefix_ids)
    contexts = [c.meta.get("context_ids") or [] for c in chunks]  # context-enriched entries (chunkcache/context.py)
    with rt.lock:
        scratch = prefix_cache(rt.lm, list(rt.template.prefix_ids),
                               prefix_len + max(len(c.token_ids) + len(x) for c, x in zip(chunks, contexts)))
        # An enriched entry is recomputed as ingest computed it: over its neighbour's stored entry, if still there.
        items = [(c.key, context_chunk_kv(rt.lm, scratch, prefix_len, context, c.token_ids, rt.kv_dtype,
                                          context_kv=plain_kv(rt, bytes.fromhex(c.meta["neighbour"])))
                  if context else chunk_kv(rt.lm, scratch, prefix_len, c.token_ids, rt.kv_dtype))
                 for c, context in zip(chunks, contexts)]
    rt.store.kv.replace_kv(items)


def _store_batch(rt: Runtime, batch: list[PendingChunk], scratch, report: IngestReport, bar, embed: bool,
                 index: bool) -> None:
    vectors: list[np.ndarray | None] = [None] * len(batch)
    if embed:
        t = time.perf_counter()
        vectors = list(rt.embedder.encode([c.text for c in batch]))
        report.seconds_embed += time.perf_counter() - t
    items = []
    prefix_len = len(rt.template.prefix_ids)
    for chunk, vec in zip(batch, vectors):
        t = time.perf_counter()
        kv = chunk_kv(rt.lm, scratch, prefix_len, chunk.token_ids, rt.kv_dtype)
        report.seconds_kv += time.perf_counter() - t
        report.tokens_computed += len(chunk.token_ids)
        items.append((chunk.key, kv, chunk.meta, vec))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tok_s=f"{report.tokens_per_s:.0f}", refresh=False)
    ids = rt.store.kv.put_chunks(items)
    report.chunks_computed += len(batch)
    if embed and index:
        rt.store.add_to_index(np.array([ids[c.key] for c in batch], dtype=np.int64),
                              np.stack(vectors).astype(np.float32))
