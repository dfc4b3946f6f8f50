"""Calibration files: the fitted attention scale is written, found for its own model only, and used."""
from __future__ import annotations

import json
import math

import pytest
import torch

from chunkcache import calibration

QUESTION = "Where is Mount Everest?"
FORCED = [1000, 2000, 3000]


@pytest.fixture
def calibration_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "CALIBRATION_DIR", tmp_path)
    calibration.load_chunk_log_scale.cache_clear()
    calibration.load_blend_log_scale.cache_clear()
    yield tmp_path
    calibration.load_chunk_log_scale.cache_clear()
    calibration.load_blend_log_scale.cache_clear()


def test_round_trip_and_pipeline_uses_it(calibration_dir, tiny_pipe, docs):
    lm = tiny_pipe.rt.lm
    plain, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse", chunk_scale="calibrated")
    table = torch.linspace(-1.0, -0.2, lm.num_layers * lm.num_q_heads).view(lm.num_layers, lm.num_q_heads)
    path = calibration.write_calibration(lm, table, {"note": "test"})
    assert path.parent == calibration_dir and json.loads(path.read_text())["fit"] == {"note": "test"}
    loaded = calibration.load_chunk_log_scale(lm.calibration_id, lm.num_layers, lm.num_q_heads)
    torch.testing.assert_close(loaded, table, atol=1e-5, rtol=0)
    calibrated, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse", chunk_scale="calibrated")
    off, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse", chunk_scale="off")
    torch.testing.assert_close(off, plain)  # without a file, "calibrated" is no correction
    assert (calibrated - off).abs().max() > 1e-3


def test_no_file_means_no_correction(calibration_dir):
    assert calibration.load_chunk_log_scale("0" * 32, 4, 2) is None


def test_calibration_is_independent_of_compute_dtype(tiny_lm):
    assert tiny_lm.calibration_id and tiny_lm.calibration_id != tiny_lm.fingerprint


def test_wrong_shape_is_refused(calibration_dir, tiny_lm):
    with pytest.raises(ValueError, match="layers"):
        calibration.write_calibration(tiny_lm, torch.zeros(tiny_lm.num_layers + 1, 1), {})
    path = calibration.write_calibration(tiny_lm, torch.zeros(tiny_lm.num_layers, 1), {})
    body = json.loads(path.read_text())
    body["layers"] = 99
    body["chunk_log_scale"] = body["chunk_log_scale"][:-1]
    path.write_text(json.dumps(body))
    calibration.load_chunk_log_scale.cache_clear()
    with pytest.raises(ValueError, match="does not fit"):
        calibration.load_chunk_log_scale(tiny_lm.calibration_id, tiny_lm.num_layers, tiny_lm.num_q_heads)


def test_blend_has_its_own_scale_and_reuse_keeps_the_table(calibration_dir, tiny_pipe, docs):
    """A blend scale in the file: blend ("calibrated") runs exactly as with chunk_scale=S, reuse and epic
    still use the per-layer table."""
    lm = tiny_pipe.rt.lm
    with pytest.raises(ValueError, match="calibration file"):
        calibration.write_blend_scale(lm, 0.35, {})
    table = torch.linspace(-1.0, -0.2, lm.num_layers).view(lm.num_layers, 1)
    calibration.write_calibration(lm, table, {})
    reuse_table, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse", chunk_scale="calibrated")
    path = calibration.write_blend_scale(lm, 0.35, {"chosen": 0.35})
    assert json.loads(path.read_text())["blend_fit"] == {"chosen": 0.35}
    with pytest.raises(ValueError, match="blend scale"):
        calibration.write_blend_scale(lm, 1.5, {})
    kwargs = dict(documents=docs, mode="blend", recompute_ratio=0.3)
    blend, _ = tiny_pipe.score(QUESTION, FORCED, chunk_scale="calibrated", **kwargs)
    stored = math.exp(json.loads(path.read_text())["blend_log_scale"])  # 0.35 to the file's 5 decimals of log
    uniform, _ = tiny_pipe.score(QUESTION, FORCED, chunk_scale=stored, **kwargs)
    torch.testing.assert_close(blend, uniform, atol=1e-6, rtol=0)
    reuse, _ = tiny_pipe.score(QUESTION, FORCED, documents=docs, mode="reuse", chunk_scale="calibrated")
    torch.testing.assert_close(reuse, reuse_table)


def test_enriched_chunks_take_their_recipes_scale(calibration_dir, tiny_pipe, docs):
    """With a context scale in the file, blend ("calibrated") over enriched chunks runs exactly as with that S
    given; over the plain entries it keeps blend's own S."""
    lm = tiny_pipe.rt.lm
    tiny_pipe.ingest_texts(docs, progress=False)
    calibration.write_calibration(lm, torch.full((lm.num_layers, 1), -1.0), {})
    calibration.write_blend_scale(lm, 0.35, {})
    with pytest.raises(ValueError, match="context scale"):
        calibration.write_context_scale(lm, "neighbour", 0.0, {})
    path = calibration.write_context_scale(lm, "neighbour", 0.85, {"chosen": 0.85})
    body = json.loads(path.read_text())
    assert body["context_fit"] == {"neighbour": {"chosen": 0.85}} and "blend_log_scale" in body
    kwargs = dict(documents=docs, mode="blend", recompute_ratio=0.3)
    calibrated, stats = tiny_pipe.score(QUESTION, FORCED, chunk_scale="calibrated", **kwargs)
    assert stats.context_chunks == 2
    given, _ = tiny_pipe.score(QUESTION, FORCED, chunk_scale=math.exp(body["context_log_scale"]["neighbour"]),
                               **kwargs)
    torch.testing.assert_close(calibrated, given, atol=1e-6, rtol=0)
    logprobs, plain = tiny_pipe.evaluate(QUESTION, FORCED, free_running=False, chunk_scale="calibrated",
                                         plain_entries=True, **kwargs)
    blend_s, _ = tiny_pipe.evaluate(QUESTION, FORCED, free_running=False, plain_entries=True,
                                    chunk_scale=math.exp(body["blend_log_scale"]), **kwargs)
    assert plain.stats.context_chunks == 0
    torch.testing.assert_close(logprobs, blend_s, atol=1e-6, rtol=0)
