"""Distributed ingest on Ray: chunk prefill and embedding fanned out over Ray actors that write to the
shared store themselves (`chunkcache ingest PATHS --store redis://... --ray [ADDRESS]`).

The driver reads and chunks the files as a plain ingest does, finds the chunks not yet stored, and hands
them to a pool of actors in batches. Each actor loads the model and the embedder once, computes its
batch's KVs and embeddings, and writes them to the shared tier in one transaction (`put_chunks`), so no
tensor travels back through the driver. The driver then records each source as complete, exactly as a
local ingest does, so the run is resumable with the same skip-what-is-stored semantics:
- a chunk is stored once whoever computes it (content keys; writers that race get one id);
- an actor killed mid-batch is restarted and its batch retried (Ray's `max_restarts`/`max_task_retries`);
  a batch written before the kill is skipped on retry (`missing`), so nothing is duplicated or lost;
- a driver killed mid-run leaves its sources incomplete; the next run computes only what is missing.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # restarts of a killed actor, and retries of the batch it was running


@dataclass(frozen=True)
class RayOptions:
    """How to run an ingest on Ray.

    address: None starts (or joins) a local cluster with `ray.init()`; "auto" joins the cluster this
        machine belongs to; "ray://HEAD:10001" connects a client to a remote cluster.
    workers: actors; each loads its own copy of the model.
    threads: torch threads per actor (None: this machine's cores divided among the workers, for a local
        cluster; set it for a remote one).
    batch: chunks per actor call and per store transaction.
    gpus: GPUs per actor (e.g. 1 on GPU nodes: Ray then places one actor per GPU).
    """
    address: str | None = None
    workers: int = 2
    threads: int | None = None
    batch: int = 16
    gpus: float = 0


class _Worker:
    """One Ray actor: a runtime on the shared store (models loaded once), computing batches of chunks."""

    def __init__(self, store: str, config, threads: int):
        import torch

        from .runtime import Runtime

        torch.set_num_threads(threads)
        self.rt = Runtime.open(store, config)

    def store(self, batch: list[tuple]) -> dict:
        from .ingest import IngestReport, PendingChunk, store_chunks

        report = IngestReport()
        chunks = [PendingChunk(*item) for item in batch]
        store_chunks(self.rt, chunks, report=report, embed=True, index=False)
        return {"chunks": report.chunks_computed, "tokens": report.tokens_computed, "seconds_kv": report.seconds_kv,
                "seconds_embed": report.seconds_embed, "pid": os.getpid()}


def worker_store_spec(spec) -> str:
    """What the workers open: the shared tier alone (a near cache directory is this machine's, not theirs).

    Raises:
        ValueError: the store is LMDB alone, which workers on other machines cannot reach.
    """
    if spec.remote is None:
        raise ValueError(f"--ray needs a shared store that every worker can write to: a redis:// URL or "
                         f"lmdb:DIR+redis://... (got {spec.describe()}). Start Redis and ingest into it")
    return spec.remote


def compute_on_ray(rt, chunks: list, options: RayOptions, report, bar=None, on_batch=None) -> None:
    """Compute and store every chunk of `chunks` (PendingChunks, none stored yet) on Ray actors.

    Updates `report` (chunks and tokens computed, compute seconds summed over workers, worker processes)
    and `bar`; `on_batch(result)` sees each batch's result dict (chunks, tokens, seconds, pid).
    Raises:
        RuntimeError: Ray cannot start or connect, or a batch failed after its retries.
    """
    if not chunks:
        return
    import ray
    from ray.util import ActorPool

    store = worker_store_spec(rt.store.spec)
    threads = options.threads or max(1, (os.cpu_count() or 1) // options.workers)
    started_ray = not ray.is_initialized()
    if started_ray:
        log.info("starting Ray (%s)", options.address or "a local cluster")
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except Exception as e:  # noqa: BLE001 - Ray raises several types for a bad address
            raise RuntimeError(f"cannot start or reach Ray at {options.address or 'a local cluster'}: {e}") from e
    worker = ray.remote(num_cpus=1, num_gpus=options.gpus, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)(_Worker)
    # NOTE: the config travels, not the loaded model: every actor opens the store as a new process would,
    # so the manifest check guards workers too.
    actors = [worker.remote(store, rt.config.replace(threads=threads), threads) for _ in range(options.workers)]
    batches = [[(c.key, c.token_ids, c.text, c.meta) for c in chunks[i:i + options.batch]]
               for i in range(0, len(chunks), options.batch)]
    started = time.perf_counter()
    pids: set[int] = set()
    try:
        for done in ActorPool(actors).map_unordered(lambda actor, batch: actor.store.remote(batch), batches):
            report.chunks_computed += done["chunks"]
            report.tokens_computed += done["tokens"]
            report.seconds_kv += done["seconds_kv"]
            report.seconds_embed += done["seconds_embed"]
            pids.add(done["pid"])
            report.workers = len(pids)
            if on_batch is not None:
                on_batch(done)
            if bar is not None:
                bar.update(done["chunks"])
                elapsed = time.perf_counter() - started
                bar.set_postfix(tok_s=f"{report.tokens_computed / elapsed:.0f}", workers=len(actors), refresh=False)
    except ray.exceptions.RayError as e:
        raise RuntimeError(f"distributed ingest failed: {e}. Chunks already stored are kept; re-run to resume") from e
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_ray:  # a cluster this call started (or joined) is left as it was found
            ray.shutdown()
