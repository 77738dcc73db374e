"""Scoring passes averaged: means, standard errors, counts and statuses, against hand sums."""
import math

import pyarrow as pa
import pytest

from pipeline.io.store import SCORE_SCHEMA
from pipeline.decide.scores import JudgeSettings
from pipeline.run.passes import ERRORS, MEANS, average, precision_record, spend


def table(values, se, status, nfe=16, reused=False):
    n = len(values)
    cols = {f.name: pa.nulls(n, f.type) for f in SCORE_SCHEMA}
    cols.update(id=pa.array([f"i{k}" for k in range(n)]), status=pa.array(status),
                reject_reason=pa.array([None if s == "ok" else "non_finite_score" for s in status]),
                nfe=pa.array([nfe] * n, pa.int64()), passes=pa.array([1] * n, pa.int64()),
                reused=pa.array([reused] * n))
    for c in MEANS:
        cols[c] = pa.array(values, pa.float64())
    for c in ERRORS:
        cols[c] = pa.array(se, pa.float64())
    return pa.table(cols, schema=SCORE_SCHEMA)


def test_three_passes_average_to_the_mean_with_the_standard_error_of_a_mean():
    a = table([1.0, 10.0, None], [2.0, 1.0, None], ["ok", "ok", "rejected"])
    b = table([4.0, 13.0, None], [2.0, 1.0, None], ["ok", "ok", "rejected"])
    c = table([7.0, 16.0, None], [2.0, 1.0, None], ["ok", "rejected", "rejected"])
    two = average(a, b, 1)
    three = average(two, c, 2)
    for col in MEANS:
        assert three.column(col).to_pylist()[0] == pytest.approx(4.0)  # (1 + 4 + 7) / 3
        assert three.column(col).to_pylist()[2] is None
    for col in ERRORS:  # three independent estimates of sd 2: sd 2 / sqrt 3
        assert three.column(col).to_pylist()[0] == pytest.approx(2 / math.sqrt(3))
    assert three.column("nfe").to_pylist() == [48, 48, 48] and three.column("passes").to_pylist() == [3, 3, 3]
    assert three.column("status").to_pylist() == ["ok", "rejected", "rejected"]  # non-finite in one pass
    assert three.column("reject_reason").to_pylist()[1] == "non_finite_score"
    assert average(table([1.0], [1.0], ["ok"], reused=True), table([1.0], [1.0], ["ok"], reused=False), 1) \
        .column("reused").to_pylist() == [False]
    with pytest.raises(ValueError, match="different rows"):
        average(a, table([1.0], [1.0], ["ok"]), 1)


def test_passes_are_spent_until_the_judged_score_is_precise_enough():
    """V's values 0..4 (spread 1.4826 MAD = 1.4826) with standard error 0.5 a pass: the noise
    ratio after n passes is 0.5 / sqrt(n) / 1.4826 (0.337, 0.238, 0.195, ...), so a target of
    0.2 takes exactly three passes; the target 0 one; --max-passes caps them."""
    one = table([0.0, 1.0, 2.0, 3.0, 4.0], [0.5] * 5, ["ok"] * 5)
    calls = []

    def score_pass(k):
        calls.append(k)
        return {"input": one}

    for judge, passes in [(JudgeSettings("log_volume_growth", 0.2, 4), 3), (JudgeSettings("log_volume_growth", 0, 4), 1),
                          (JudgeSettings("log_volume_growth", 0.2, 2), 2), (JudgeSettings("log_volume_growth", 0.5, 4), 1)]:
        calls.clear()
        ratios = []
        out = spend(judge, {"input": one}, score_pass, ratios)
        assert calls == list(range(1, passes)) and len(ratios) == passes
        assert ratios == [round(0.5 / math.sqrt(n) / 1.4826, 4) for n in range(1, passes + 1)]
        assert out["input"].column("passes").to_pylist() == [passes] * 5
        assert precision_record(judge, ratios) == {"passes": passes, "noise_ratio_after_each": ratios,
                                                   "score": "log_volume_growth", "target": judge.precision_target}
    # no ok row: nothing to measure, one pass
    ratios = []
    spend(JudgeSettings("log_volume_growth", 0.2, 4), {"input": table([None], [None], ["rejected"])}, score_pass, ratios)
    assert ratios == [None]


def test_judge_settings_are_checked_when_built():
    for bad in [{"precision_target": 1.0}, {"precision_target": -0.1}, {"max_passes": 0}, {"max_passes": 17},
                {"score": "nonsense"}]:
        with pytest.raises(ValueError):
            JudgeSettings(**bad)
