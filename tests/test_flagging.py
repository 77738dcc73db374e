"""Threshold policies, and reference calibration against a known score distribution."""
import numpy as np
import pytest
from scipy.stats import binom, norm

from pipeline.decide.flagging import (FlagSettings, absolute_threshold, flag, order_statistic_ranks,
                               quantile_threshold, reference_threshold, zscore_threshold)


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


@pytest.mark.parametrize("n,fpr", [(50, 0.05), (100, 0.01), (200, 0.01), (500, 0.05), (2000, 0.01)])
def test_reference_ci_covers_the_true_quantile_at_its_claimed_rate(n, fpr):
    """Simulated coverage of the claimed 95% interval, open ends counted as covering: at least
    0.95 less 4 Monte Carlo standard errors (sqrt(0.95 * 0.05 / trials)); the old clamped interval
    covered 0.61 at n = 100, A = 0.01."""
    rng = np.random.default_rng(n)
    trials = 2000
    true_q = 100 + 15 * norm.ppf(1 - fpr)
    cis = [reference_threshold(rng.normal(100, 15, n), fpr).details["ci"] for _ in range(trials)]
    covered = np.mean([(lo is None or lo <= true_q) and (hi is None or true_q <= hi) for lo, hi in cis])
    assert covered >= 0.95 - 4 * np.sqrt(0.95 * 0.05 / trials), covered
    open_above = np.mean([hi is None for _, hi in cis])
    assert open_above == (1.0 if (1 - fpr) ** n > 0.025 else 0.0)  # (1 - A)^n > alpha/2: no rank bounds it


def test_order_statistic_ranks_match_the_binomial():
    r, s = order_statistic_ranks(1000, 0.95, 0.95)
    assert binom.cdf(r - 1, 1000, 0.95) <= 0.025 < binom.cdf(r, 1000, 0.95)
    assert binom.cdf(s - 2, 1000, 0.95) < 0.975 <= binom.cdf(s - 1, 1000, 0.95)
    assert order_statistic_ranks(100, 0.99, 0.95)[1] == 101  # unbounded above


def test_small_reference_warns_with_the_size_it_needs():
    t = reference_threshold(np.arange(100.0), 0.01)
    assert t.details["ci"][1] is None
    assert "368" in t.details["warning"] and "unbounded above" in t.details["warning"]
    assert "warning" in reference_threshold(np.arange(20.0), 0.05).details
    assert "warning" not in reference_threshold(np.arange(2000.0), 0.01).details


def test_quantile_zscore_absolute():
    s = np.arange(1, 101, dtype=float)
    assert quantile_threshold(s, 0.9).value == pytest.approx(np.quantile(s, 0.9))
    z = zscore_threshold(s, 2.0)
    assert z.value == pytest.approx(50.5 + 2 * 1.4826 * 25)
    assert flag(np.array([1.0, 10.0, np.nan]), absolute_threshold(s, 5.0)).tolist() == [False, True, False]
    t = absolute_threshold(s, 5.0)
    assert "5" in t.reason(7.0, "log_volume_growth") and "absolute" in t.reason(7.0, "x")


def test_policy_choice_is_validated():
    assert FlagSettings().policy() == "quantile"
    assert FlagSettings(reference="held").policy() == "reference_fpr"
    with pytest.raises(ValueError, match="needs --reference"):
        FlagSettings(fpr=0.1)
    with pytest.raises(ValueError, match="one flagging policy"):
        FlagSettings(zscore=3, threshold=1.0)
    with pytest.raises(ValueError, match="one flagging policy"):  # a reference no longer silently wins
        FlagSettings(quantile=0.9, reference="held")
    for bad in (dict(quantile=1.5), dict(quantile=0.0), dict(fpr=1.0), dict(zscore=float("inf")),
                dict(threshold=float("nan"))):
        with pytest.raises(ValueError, match="must be"):
            FlagSettings(**bad)
    with pytest.raises(ValueError, match="no finite"):
        quantile_threshold(np.array([np.nan]), 0.5)


def test_every_policy_has_one_signature_and_is_reached_through_the_settings():
    """Each POLICIES entry is threshold(sample, parameter): the settings pick the sample (the
    dataset's or the reference's scores) and the parameter (given, or the default); a policy
    reading the reference is refused without one. Hand-computed answers on 1..100 and 101..200."""
    import inspect

    from pipeline.decide.flagging import POLICIES

    for p in POLICIES.values():  # exactly two required arguments: the sample and the parameter
        assert [q.kind for q in inspect.signature(p.threshold).parameters.values()
                if q.default is inspect.Parameter.empty] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
    data, ref = np.arange(1, 101, dtype=float), np.arange(101, 201, dtype=float)
    cases = {"quantile": (FlagSettings(), np.quantile(data, 0.95)),
             "reference_fpr": (FlagSettings(reference="held", fpr=0.1), np.quantile(ref, 0.9)),
             "robust_zscore": (FlagSettings(zscore=1.0), 50.5 + 1.4826 * 25),
             "absolute": (FlagSettings(threshold=3.5), 3.5)}
    assert set(cases) == set(POLICIES)
    for name, (settings, want) in cases.items():
        t = settings.threshold_for(data, ref)
        assert t.policy == name and t.value == pytest.approx(want, rel=1e-12), name
    with pytest.raises(ValueError, match="needs the reference"):
        FlagSettings(reference="held").threshold_for(data, None)
