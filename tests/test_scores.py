"""The judged scores: calibrations for complexity recovered on planted trends, robust where the
dataset holds memorized outliers, and the derived scores' formulas on hand-made columns."""
import math

import numpy as np
import pytest

from pipeline.decide.scores import (Calibration, Fit, calibrate, check_judgeable, judged, judged_columns)


def columns(n=400, slope=-0.05, seed=0, outliers=0):
    """V = 900 + slope c + N(0, 5), -log L = 3 + 0.001 c + N(0, 0.1), c ~ U(500, 1500); the first
    `outliers` rows get V + 200 and -log L + 3 (memorized images)."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(500, 1500, n)
    V = 900 + slope * c + rng.normal(0, 5, n)
    nll = 3 + 0.001 * c + rng.normal(0, 0.1, n)
    V[:outliers] += 200
    nll[:outliers] += 3
    return {"log_volume_growth": V, "log_volume_growth_se": np.full(n, 2.0), "complexity": c,
            "denoising_loss": np.exp(-nll), "denoising_loss_se": 0.05 * np.exp(-nll),
            "logp": V - 10, "window_volume_growth": V / 2, "window_volume_growth_se": np.full(n, 1.0)}


def test_least_squares_on_the_reference_recovers_the_trend():
    """On 400 rows with noise sd 5 over a complexity range of 1000, the slope's standard error is
    5 / (1000 / sqrt 12 * sqrt 400) = 8.7e-4: within 5 of them of -0.05; the residual's scale is
    the noise's sd within 5 / sqrt(2 n) relatively (1.4826 MAD of a normal)."""
    cal = calibrate(columns(), "reference")
    fit = cal.fits["log_volume_growth"]
    assert cal.method == "least_squares" and fit.n == 400
    assert abs(fit.slope + 0.05) < 5 * 8.7e-4 and abs(fit.scale / 5 - 1) < 5 / math.sqrt(2 * 400) * 1.7
    assert abs(cal.fits["denoising_score"].slope - 0.001) < 5 * 0.1 / (1000 / math.sqrt(12) * 20)


def test_the_robust_fit_on_the_dataset_ignores_memorized_outliers():
    """With 10% of the rows 200 nats higher (memorized), least squares moves its intercept by
    about 20; Theil-Sen stays within 5 slope standard errors of the planted trend, as on clean
    data (its efficiency is near least squares': sd 1.0e-3 here)."""
    cols = columns(outliers=40)
    robust = calibrate(cols, "dataset").fits["log_volume_growth"]
    plain = calibrate(cols, "reference").fits["log_volume_growth"]
    assert abs(robust.slope + 0.05) < 5 * 1.0e-3 and abs(robust.intercept - 900) < 5
    assert abs(plain.intercept - 920) < 6  # least squares: pulled up by the 10% at +200 (their mean, 20)


def test_derived_scores_follow_their_formulas():
    fits = {"log_volume_growth": Fit(100.0, -0.1, 1.0, 2.0, 10), "denoising_score": Fit(2.0, 0.001, 0.5, 0.25, 10)}
    cal = Calibration("reference", "least_squares", fits)
    cols = {"log_volume_growth": np.array([50.0, np.nan]), "log_volume_growth_se": np.array([4.0, np.nan]),
            "complexity": np.array([300.0, 300.0]), "denoising_loss": np.array([math.exp(-3.0), 0.5]),
            "denoising_loss_se": np.array([0.1 * math.exp(-3.0), 0.05])}
    out = judged_columns(cols, cal)
    assert out["calibrated_volume_growth"][0] == pytest.approx(50 - (100 - 30))  # V - (a + b c) = -20
    assert out["denoising_score"][0] == pytest.approx(3.0) and out["denoising_score_se"][0] == pytest.approx(0.1)
    assert out["calibrated_denoising_score"][0] == pytest.approx(3.0 - 2.3)
    z1, z2 = (-20 - 1.0) / 2.0, (0.7 - 0.5) / 0.25
    assert out["combined_score"][0] == pytest.approx((z1 + z2) / math.sqrt(2))
    assert out["combined_score_se"][0] == pytest.approx(math.sqrt((4 / 2) ** 2 + (0.1 / 0.25) ** 2) / math.sqrt(2))
    assert math.isnan(out["calibrated_volume_growth"][1]) and math.isnan(out["combined_score"][1])
    values, se = judged(cols, "log_volume_growth", cal)
    assert values[0] == 50 and se[0] == 4
    with pytest.raises(ValueError, match="combined_score needs"):
        check_judgeable("combined_score", Calibration("dataset", "theil_sen", {"log_volume_growth": fits["log_volume_growth"]}))
    check_judgeable("log_volume_growth", Calibration("dataset", "theil_sen", {}))  # raw scores need no fit
    two = calibrate({k: v[:2] for k, v in columns().items()}, "dataset")  # too few to fit: the median, no slope
    assert two.fits["log_volume_growth"].slope == 0 and two.fits["log_volume_growth"].n == 2
    assert calibrate({**columns(), "denoising_loss": np.full(400, np.nan)}, "dataset").fits.keys() == {"log_volume_growth"}
