"""OpenMP settings for the engine thread, applied before torch loads libgomp (which reads them once).

The engine runs the model on its own thread. With libgomp, a parallel region started from any thread
but the process's first costs ~60 us more once the first thread has a team of its own (which loading
the model gives it): libgomp then counts more of its threads than CPUs and its workers stop spinning
between regions, so each region waits for them to wake. A decode step runs ~200 regions (oneDNN
linears, norms), which made SmolLM2-135M decode at 38-40 ms a token in the engine against 25 ms
from the main thread (2 cores; 1536x576 linear at one row: 135 against 70 us). Workers that spin a
bounded while before sleeping (OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT=100000) bring the engine to
27-28 ms; unbounded spinning (ACTIVE alone) is worse, since idle teams then hold the cores.

They are set in os.environ, so child processes (Ray workers, benchmark servers) inherit them too. Idle
workers spin up to 100,000 rounds (a few milliseconds at most) before sleeping, so two processes
sharing cores lose about what libgomp's own default spin costs them.

That spin only applies while libgomp's threads are no more than the CPUs. Each thread that starts a
parallel region keeps a team for as long as it lives, so a model loaded on the main thread left the
main thread a team; the engine's team then made them more than the cores, and libgomp cut every
worker's spin to ~1,000 rounds. On a 2-core AMD EPYC that cost the engine 71-87 ms a decode token
against 52-62 with no main-thread team (same requests, processes alternating, three pairs). So
`in_passing_thread` runs model loading, and the pipeline's own torch work on callers' threads
(retrieve, embed), on a thread that exits after it, and its team goes with it.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")

SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000"}


def tune_before_torch() -> bool:
    """Set SETTINGS where the user has not set them, if torch is not loaded yet; returns whether the
    process runs with them (False when torch was imported first, too late to change; True then only if
    the environment already held them, as when the process was started with them)."""
    if "torch" not in sys.modules:
        for name, value in SETTINGS.items():
            os.environ.setdefault(name, value)
        return True
    return all(name in os.environ for name in SETTINGS)


TUNED = tune_before_torch()


def untuned_warning() -> str | None:
    """What to tell a user whose engine thread runs without the settings (None when it has them)."""
    if TUNED:
        return None
    return ("torch was imported before chunkcache, so its OpenMP threads run untuned: the engine thread "
            "decodes up to ~1.4x slower on CPU. Import chunkcache before torch, or set "
            + " ".join(f"{k}={v}" for k, v in SETTINGS.items()) + " in the environment (chunkcache/openmp.py).")


def in_passing_thread(work: Callable[[], T]) -> T:
    """work() run on a thread of its own that then exits, so that the OpenMP team the work starts (loading
    and packing a model runs parallel regions) leaves with it rather than staying with the caller's thread
    beside the engine's (see the module docstring). Its result is returned and its exception raised here."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # handed to the caller, whatever it is
            outcome["error"] = exc

    # A daemon: should the process still exit mid-work (a second Ctrl-C), the thread does not hold it up.
    thread = threading.Thread(target=run, name="chunkcache-passing", daemon=True)
    thread.start()
    try:
        thread.join()
    except BaseException:  # Ctrl-C: the work runs on, so let it finish before the caller cleans up after it
        thread.join()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
