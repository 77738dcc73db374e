"""Threshold policies, and reference calibration against a known score distribution."""
import numpy as np
import pytest
from scipy.stats import binom

from pipeline.flagging import (FlagSettings, absolute_threshold, flag, quantile_threshold,
                               reference_threshold, zscore_threshold)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_reference_calibration_realises_the_false_flag_rate(fpr):
    """Unmemorized training scores share the reference's distribution: the share flagged
    among them must be fpr, within the binomial interval of the test itself plus the
    threshold's own sampling error (a 2,000-image reference)."""
    rng = np.random.default_rng(0)
    hits = []
    for trial in range(20):
        reference = rng.normal(100, 15, 2000)
        unmemorized = rng.normal(100, 15, 20000)
        t = reference_threshold(reference, fpr)
        hits.append(flag(unmemorized, t).mean())
        lo, hi = t.details["ci"]
        assert lo <= t.value <= hi
    # the mean over 20 trials of 20,000: the threshold's error dominates, sd ~ sqrt(fpr(1-fpr)/2000)
    sd = np.sqrt(fpr * (1 - fpr) / 2000 / 20 + fpr * (1 - fpr) / 20000 / 20)
    assert abs(np.mean(hits) - fpr) < 4 * sd
    # each trial's rate lies within the binomial interval widened for the reference size
    lo, hi = binom.ppf([0.0005, 0.9995], 2000, fpr) / 2000
    assert all(lo - 0.01 <= h <= hi + 0.01 for h in hits)


def test_reference_ci_covers_the_true_quantile():
    rng = np.random.default_rng(1)
    true_q = 15 * 1.6448536269514722 + 100  # 95% quantile of N(100, 15^2)
    covered = [reference_threshold(rng.normal(100, 15, 500), 0.05).details["ci"] for _ in range(300)]
    rate = np.mean([lo <= true_q <= hi for lo, hi in covered])
    assert 0.91 <= rate <= 0.99


def test_small_reference_warns():
    assert "warning" in reference_threshold(np.arange(20.0), 0.05).details


def test_quantile_zscore_absolute():
    s = np.arange(1, 101, dtype=float)
    assert quantile_threshold(s, 0.9).value == pytest.approx(np.quantile(s, 0.9))
    z = zscore_threshold(s, 2.0)
    assert z.value == pytest.approx(50.5 + 2 * 1.4826 * 25)
    assert flag(np.array([1.0, 10.0, np.nan]), absolute_threshold(5.0)).tolist() == [False, True, False]
    t = absolute_threshold(5.0)
    assert "5" in t.reason(7.0, "log_volume_growth") and "absolute" in t.reason(7.0, "x")


def test_policy_choice_is_validated():
    assert FlagSettings().policy(False) == "quantile"
    assert FlagSettings().policy(True) == "reference_fpr"
    with pytest.raises(ValueError, match="needs --reference"):
        FlagSettings(fpr=0.1).policy(False)
    with pytest.raises(ValueError, match="one flagging policy"):
        FlagSettings(zscore=3, threshold=1.0).policy(False)
    with pytest.raises(ValueError):
        quantile_threshold(np.array([1.0]), 1.5)
    with pytest.raises(ValueError, match="no finite"):
        quantile_threshold(np.array([np.nan]), 0.5)
