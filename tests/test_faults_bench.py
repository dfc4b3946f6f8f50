"""bench.faults as a test: byte flips in data.mdb are detected or harmless, never silent or a signal; an
ingest killed with SIGKILL leaves a clean store and resumes to completion; so does a process killed while
writing request documents."""
from __future__ import annotations

import pytest

from bench.faults import run_flips, run_kills, run_query_kills


def test_random_byte_flips_are_detected_or_harmless():
    result = run_flips(40, seed=3)
    assert result["failures"] == []
    assert sum(result["outcomes"].values()) == 40 and result["outcomes"].get("detected", 0) > 0
    assert not any("SILENT" in k for k in result["entry_results"])


@pytest.mark.slow
def test_kill_9_during_ingest_leaves_a_clean_store_that_resumes():
    result = run_kills(3, seed=5)
    assert result["failures"] == []
    assert result["corrupt_after_kill"] == 0 and result["duplicate_ids"] == 0 and result["resumes_complete"] == 3


@pytest.mark.slow
def test_kill_9_while_writing_request_documents_leaves_a_store_that_opens_clean_under_its_cap():
    result = run_query_kills(2, seed=2)
    assert result["failures"] == [] and result["opened_clean"] == 2 and result["killed"] == 2
