"""Scoring passes: what precision a model needs, spent as whole passes with new probes and noises.

A pass with the next seed is an independent estimate of every image's V and loss (probes and
noises are a hash of the seed and the image), so the mean of n passes has 1/n of one pass's
variance. A run scores once, then again while the judged score's noise ratio (decide/scores.py
noise_ratio: rms standard error over the spread of the scores) is above --precision-target, up
to --max-passes: a model whose images are close together gets the passes it needs to rank
them reproducibly, and one like the demo's gets no more than one.
"""
from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.decide.scores import JudgeSettings, judge_scores, noise_ratio
from pipeline.io.store import ok_mask

MEANS = ("log_volume_growth", "prior_logp", "logp", "bits_per_dim", "window_volume_growth", "denoising_loss")
ERRORS = ("log_volume_growth_se", "window_volume_growth_se", "denoising_loss_se")


def average(mean: pa.Table, more: pa.Table, n: int) -> pa.Table:
    """The mean of n + 1 passes from the mean of n (`mean`) and one more (`more`), the same rows
    in the same order: each score column m + (x - m) / (n + 1), each standard error
    sqrt(n^2 se_m^2 + se_x^2) / (n + 1); nfe adds up, passes counts, reused holds if both were
    reused; a row is ok only if it is ok in every pass (a pass may find a score non-finite)."""
    if not mean.column("id").equals(more.column("id")):
        raise ValueError("scoring passes over different rows: the source changed between them")
    out = mean
    for c in MEANS:
        m, x = mean.column(c), more.column(c)
        out = out.set_column(out.schema.get_field_index(c), c, pc.add(m, pc.divide(pc.subtract(x, m), n + 1.0)))
    for c in ERRORS:
        m, x = mean.column(c), more.column(c)
        var = pc.add(pc.multiply(pc.multiply(m, m), float(n * n)), pc.multiply(x, x))
        out = out.set_column(out.schema.get_field_index(c), c, pc.divide(pc.sqrt(var), n + 1.0))
    out = out.set_column(out.schema.get_field_index("nfe"), "nfe", pc.add(mean.column("nfe"), more.column("nfe")))
    out = out.set_column(out.schema.get_field_index("passes"), "passes",
                         pc.add(mean.column("passes"), more.column("passes")))
    out = out.set_column(out.schema.get_field_index("reused"), "reused",
                         pc.and_kleene(mean.column("reused"), more.column("reused")))
    lost = pc.and_(pc.equal(mean.column("status"), "ok"), pc.not_equal(more.column("status"), "ok"))
    for c in ("status", "reject_reason"):
        out = out.set_column(out.schema.get_field_index(c), c, pc.if_else(lost, more.column(c), out.column(c)))
    return out


def judged_noise(table: pa.Table, reference: pa.Table | None, score: str) -> float | None:
    """The judged score's noise ratio over the table's ok rows (decide/scores.py noise_ratio),
    calibrated as flagging calibrates it; None when no row is ok."""
    ok = ok_mask(table)
    return round(noise_ratio(judge_scores(table, ok, reference, score), ok), 4) if ok.any() else None


def precision_record(judge: JudgeSettings, ratios: list[float | None]) -> dict[str, Any]:
    """What the passes spent, as outputs record it (clean's manifest scoring.precision, the score
    file's metadata precision)."""
    return {"passes": len(ratios), "noise_ratio_after_each": ratios, "score": judge.score,
            "target": judge.precision_target}


def spend(judge: JudgeSettings, first: dict[str, pa.Table], score_pass: Callable[[int], dict[str, pa.Table]],
          ratios: list[float | None]) -> dict[str, pa.Table]:
    """Passes until the judged score is precise enough: `first` is pass 0's tables by source
    ("input" and, for clean, "reference"), score_pass(k) scores pass k (seed + k) into tables of
    the same rows; each is averaged in while judge.another_pass says so. `ratios` gets the noise
    ratio after each pass (the manifest's scoring.precision)."""
    tables = first
    while True:
        ratios.append(judged_noise(tables["input"], tables.get("reference"), judge.score))
        if not judge.another_pass(ratios):
            return tables
        more, n = score_pass(len(ratios)), len(ratios)
        tables = {k: average(v, more[k], n) for k, v in tables.items()}
