"""chunkcache/openmp.py: OpenMP settings for the engine thread reach libgomp only if set before torch loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = ("import json, os, sys; {first}; import chunkcache.openmp as o; "
         "print(json.dumps([o.TUNED, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), "
         "o.untuned_warning()]))")


def _probe(first: str, **env) -> list:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | env
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=environ, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_chunkcache_first_sets_bounded_spinning_and_keeps_the_users_choice():
    assert _probe("pass") == [True, "ACTIVE", "100000", None]
    assert _probe("pass", OMP_WAIT_POLICY="PASSIVE")[:3] == [True, "PASSIVE", "100000"]


def test_torch_first_is_reported_with_what_to_do():
    tuned, policy, _, warning = _probe("import torch")
    assert tuned is False and policy is None
    assert "Import chunkcache before torch" in warning and "OMP_WAIT_POLICY=ACTIVE" in warning
    assert _probe("import torch", OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="5000")[0] is True


def test_in_passing_thread_returns_and_raises_from_a_thread_that_exits():
    import threading

    import pytest

    from chunkcache.openmp import in_passing_thread

    ran_on = []
    assert in_passing_thread(lambda: ran_on.append(threading.current_thread()) or 7) == 7
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive()
    with pytest.raises(KeyError, match="gone"):
        in_passing_thread(lambda: {}["gone"])


def test_runtime_open_runs_on_a_thread_that_then_exits(tmp_path, tiny_lm, hash_embedder, monkeypatch):
    """So that the caller's thread keeps no OpenMP team beside the engine's (chunkcache/openmp.py)."""
    import threading

    import chunkcache.runtime as runtime

    threads = []
    build = runtime.build_template
    monkeypatch.setattr(runtime, "build_template", lambda *a: threads.append(threading.current_thread()) or build(*a))
    from .conftest import DOCS, open_tiny_pipe

    with open_tiny_pipe(tmp_path, tiny_lm, hash_embedder) as pipe:
        assert pipe.query("Where is Mount Everest?", documents=DOCS, max_new_tokens=2).token_ids
    assert threads and threads[0] is not threading.current_thread() and not threads[0].is_alive()
