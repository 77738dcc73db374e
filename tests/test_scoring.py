"""Batch scoring: one row per input in order, rejected rows with null scores, cached scores
reused without a solve."""
import numpy as np
import torch
import pytest
from diffusers import DDPMScheduler

import pipeline.score.scoring as scoring
from pipeline.io.data import discover
from pipeline.score.cache import SCORE_COLUMNS, ScoreCache
from pipeline.score.models import load_model
from pipeline.score.scoring import image_spec, score_items
from pipeline.score.volume import ScorerSettings
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet

SETTINGS = ScorerSettings(solver="euler", steps=2)


@pytest.fixture
def model(tmp_path):
    return load_model(save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "m"))


def test_rows_in_input_order_with_rejections_and_settings(model, write_images):
    data = write_images(n=3, size=(8, 8))
    (data / "bad.png").write_bytes(b"nope")
    rows = [r for batch in score_items(model, discover(data), SETTINGS, batch_size=2) for r in batch]
    assert [r["id"] for r in rows] == ["bad.png", "img000.png", "img001.png", "img002.png"]
    assert rows[0]["status"] == "rejected" and all(rows[0][c] is None for c in SCORE_COLUMNS)
    for r in rows[1:]:
        assert r["status"] == "ok" and r["nfe"] == 2 and r["reused"] is False
        assert r["solver"] == "euler" and r["model_fingerprint"] == model.fingerprint and r["data_range"] == "[-1, 1]"
        assert r["logp"] == pytest.approx(r["prior_logp"] + r["log_volume_growth"], rel=1e-12)


def test_cached_scores_are_reused_without_solving(model, write_images, tmp_path, monkeypatch):
    data = write_images(n=2, size=(8, 8))
    spec = image_spec(model)
    cache = ScoreCache(tmp_path / "c", "k")
    first = [r for b in scoring.batched(discover(data), spec, 8) for r in scoring.score_batch(model, b, SETTINGS, cache=cache)]
    monkeypatch.setattr(scoring, "log_volume_growth", lambda *a, **k: pytest.fail("solved again"))
    again = [r for b in scoring.batched(discover(data), spec, 8) for r in scoring.score_batch(model, b, SETTINGS, cache=cache)]
    assert all(r["reused"] for r in again)
    assert [r["log_volume_growth"] for r in again] == [r["log_volume_growth"] for r in first]


def test_progress_counts_every_input(model, write_images):
    data = write_images(n=5, size=(8, 8))
    (data / "bad.png").write_bytes(b"")
    seen = []
    list(score_items(model, discover(data), SETTINGS, batch_size=2, progress=seen.append))
    assert sum(seen) == 6


def test_a_non_finite_score_rejects_the_image_and_is_never_cached(model, write_images, tmp_path, monkeypatch):
    """A model that returns NaN for some inputs: those rows are rejected (non_finite_score) with
    no number in them, nothing of theirs is cached, and the others are scored as usual."""
    data = write_images(n=4, size=(8, 8))
    real = scoring.log_volume_growth

    def nan_for_the_second(*args, **kwargs):
        r = real(*args, **kwargs)
        r.log_volume_growth[1] = float("nan")
        r.logp[1] = float("nan")
        return r

    monkeypatch.setattr(scoring, "log_volume_growth", nan_for_the_second)
    cache = ScoreCache(tmp_path / "c", "k")
    batch = next(scoring.batched(discover(data), image_spec(model), 8))
    rows = scoring.score_batch(model, batch, SETTINGS, cache=cache)
    assert [r["status"] for r in rows] == ["ok", "rejected", "ok", "ok"]
    assert rows[1]["reject_reason"] == "non_finite_score" and all(rows[1][c] is None for c in SCORE_COLUMNS)
    assert all(np.isfinite(r["log_volume_growth"]) for r in rows if r["status"] == "ok")
    assert cache.get(rows[1]["sha256"]) is None and cache.get(rows[0]["sha256"]) is not None


def test_a_batch_is_hashed_once_and_scores_as_before(model, monkeypatch):
    """fresh_scores hashes a batch's images once for V's probes and the loss's noises (each hash
    copies the batch to the host: on a GPU, a synchronisation), and gives bit for bit what V and
    the loss give when each hashes the images itself."""
    import pipeline.score.probes as probes

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    settings = ScorerSettings(solver="heun", steps=2, loss_noises=4)
    v, loss = scoring.score_images(model, x, settings), scoring.loss_images(model, x, settings)
    calls = []
    real = probes.image_keys

    def counted(seed, images):
        calls.append(images.shape[0])
        return real(seed, images)
    monkeypatch.setattr(probes, "image_keys", counted)
    monkeypatch.setattr(scoring, "image_keys", counted)
    rows = scoring.fresh_scores(model, x, settings)
    assert calls == [3]
    assert [r["log_volume_growth"] for r in rows] == v.log_volume_growth.tolist()
    assert [r["denoising_loss"] for r in rows] == loss.denoising_loss.tolist()
    calls.clear()  # no probes (exact divergence) and no loss: nothing needs the images' keys
    scoring.fresh_scores(model, x, ScorerSettings(solver="heun", steps=2, divergence="exact", loss_noises=0))
    assert calls == []
