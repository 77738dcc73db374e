"""The scores flagging can judge (`--score`), each higher = more easily reproduced, with its
standard error, from the columns of a score table.

    log_volume_growth           V(x), the seed paper's score
    logp                        log N(x_1; 0, I) + V(x)
    window_volume_growth        V over [t0, 1]: the solve less the stretch nearest the data
    calibrated_volume_growth    V - (a + b complexity): V less what the image's simplicity predicts
    denoising_score             -log L(x), L the denoising loss at one noise level (the baseline)
    calibrated_denoising_score  -log L - (a + b complexity)
    combined_score              (z(calibrated V) + z(calibrated denoising score)) / sqrt 2

A likelihood tracks simplicity (the likelihood paradox; score/complexity.py), so a plain image
scores high whether or not the model saw it. A calibrated score removes the linear trend on
complexity fitted on what the run may see: the reference's rows (held-out images, none
memorized: least squares), or without one the dataset's own, robustly (Theil-Sen on at most
FIT_ROWS rows, so that memorized images do not pull the fit). z() standardises a calibrated
score by the median and 1.4826 MAD of the same rows. `Calibration` holds what was fitted; the
manifest records it, and remediation re-scores variants with it unchanged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import pyarrow as pa

from pipeline.fields import check_choices, setting
from pipeline.io.store import JUDGED_SCHEMA, ok_mask

JUDGED = ("log_volume_growth", "logp", "window_volume_growth", "calibrated_volume_growth", "denoising_score",
          "calibrated_denoising_score", "combined_score")
DERIVED = JUDGED[3:]  # computed here from a table's columns (the first three are the scorer's own)
CALIBRATED = {"calibrated_volume_growth": "log_volume_growth", "calibrated_denoising_score": "denoising_score"}
FIT_ROWS = 2000  # rows a robust (Theil-Sen) fit uses at most: its cost grows as the square
SE_OF = {"log_volume_growth": "log_volume_growth_se", "logp": "log_volume_growth_se",
         "window_volume_growth": "window_volume_growth_se"}
# the one judged score at least the 16-noise loss on both AUCs of every evidence set, and the best duplicated
# vs unique on each (the demo: tied with the loss); combined_score's worst case is 0.011 higher, at the edge
# of the noise (benchmarks/scores.py, RESULTS.md)
DEFAULT_SCORE = "calibrated_denoising_score"
# noise / spread at which two seeds' rankings still agree: corr = 1 / (1 + r^2) >= 0.96 for r <= 0.2
DEFAULT_PRECISION = 0.2


@dataclass(frozen=True)
class JudgeSettings:
    """Which score is judged, and how precisely it must be measured: `memclean clean` flags by it,
    and both `clean` and `score` score again (run/passes.py) while its noise ratio is above the
    target. Checked when built."""

    score: str = setting(DEFAULT_SCORE, "the score that flagging judges, higher = riskier (decide/scores.py): V, "
                         "log p, V's window, V calibrated for complexity, the denoising score (-log loss), it "
                         "calibrated, or their combination", choices=JUDGED)
    precision_target: float = setting(DEFAULT_PRECISION, "score again with new probes and noises (the next seed, "
                                      "averaged in) while the judged score's rms standard error is above this share of "
                                      "its spread (1.4826 MAD) over the dataset; 0: one pass")
    max_passes: int = setting(4, "scoring passes at most (--precision-target)")

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0 <= self.precision_target < 1 or not 1 <= self.max_passes <= 16:
            raise ValueError(f"--precision-target must lie in [0, 1) and --max-passes in [1, 16], got "
                             f"{self.precision_target}, {self.max_passes}")

    def another_pass(self, ratios: list[float | None]) -> bool:
        """After passes whose noise ratios are `ratios` (None: no ok row to measure), is one more due?"""
        ratio = ratios[-1]
        return (self.precision_target > 0 and ratio is not None and ratio > self.precision_target
                and len(ratios) < self.max_passes)


@dataclass(frozen=True)
class Fit:
    """score ~ intercept + slope complexity, and the spread of what is left."""

    intercept: float
    slope: float
    median: float  # of the residuals on the fit rows
    scale: float  # 1.4826 MAD of the residuals on the fit rows
    n: int  # rows fitted


@dataclass(frozen=True)
class Calibration:
    """What the calibrated and combined scores were fitted on, and the fits."""

    fitted_on: str  # reference | dataset
    method: str  # least_squares (the reference) | theil_sen (the dataset)
    fits: dict[str, Fit] = field(default_factory=dict)  # per base score: denoising_score, log_volume_growth

    def to_dict(self) -> dict:
        return asdict(self)


def base_columns(cols: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each score the scorer gives and denoising_score = -log L, as (values, standard errors)."""
    def f(name: str) -> np.ndarray:
        return np.asarray(cols[name], dtype=np.float64) if name in cols else np.full(len(cols["log_volume_growth"]),
                                                                                     np.nan)
    out = {name: (f(name), f(se)) for name, se in SE_OF.items()}
    loss = f("denoising_loss")
    with np.errstate(divide="ignore", invalid="ignore"):
        out["denoising_score"] = (-np.log(loss), f("denoising_loss_se") / loss)  # delta method: se(log L) = se / L
    return out


def _fit(values: np.ndarray, complexity: np.ndarray, robust: bool, seed: int = 0) -> Fit | None:
    """The trend of values on complexity; None where it cannot be fitted (under 3 rows, or one
    complexity for all)."""
    ok = np.isfinite(values) & np.isfinite(complexity)
    y, c = values[ok], complexity[ok]
    if len(y) < 3 or np.ptp(c) == 0:
        return None
    if robust:
        from scipy.stats import theilslopes

        pick = np.random.default_rng(seed).choice(len(y), min(len(y), FIT_ROWS), replace=False)
        slope, intercept = (float(v) for v in theilslopes(y[pick], c[pick])[:2])
    else:
        slope, intercept = (float(v) for v in np.polyfit(c, y, 1))
    r = y - (intercept + slope * c)
    med = float(np.median(r))
    return Fit(intercept, slope, med, float(1.4826 * np.median(np.abs(r - med))) or 1.0, int(len(y)))


def calibrate(cols: Mapping[str, np.ndarray], fitted_on: str) -> Calibration:
    """Fit the calibrations on a table's ok rows (cols: its columns): least squares on the
    reference, Theil-Sen on the dataset (fitted_on says which these rows are)."""
    base, complexity = base_columns(cols), np.asarray(cols["complexity"], dtype=np.float64)
    robust = fitted_on == "dataset"
    fits = {}
    for name in ("log_volume_growth", "denoising_score"):
        fit = _fit(base[name][0], complexity, robust)
        if fit is None:
            fit = _flat(base[name][0])
        if fit is not None:
            fits[name] = fit
    return Calibration(fitted_on, "theil_sen" if robust else "least_squares", fits)


def _flat(values: np.ndarray) -> Fit | None:
    """No trend where none can be fitted (under 3 images, or one complexity for all): the
    median alone (slope 0), so a tiny run still judges; None without a finite value."""
    y = values[np.isfinite(values)]
    if not len(y):
        return None
    med = float(np.median(y))
    return Fit(med, 0.0, 0.0, float(1.4826 * np.median(np.abs(y - med))) or 1.0, int(len(y)))


def check_judgeable(name: str, calibration: Calibration) -> None:
    """A calibrated or combined score needs its fits: say so rather than judge nothing."""
    needs = {"calibrated_volume_growth": ["log_volume_growth"], "calibrated_denoising_score": ["denoising_score"],
             "combined_score": ["log_volume_growth", "denoising_score"]}.get(name, [])
    missing = [n for n in needs if n not in calibration.fits]
    if missing:
        raise ValueError(f"--score {name} needs {missing} over the {calibration.fitted_on}'s images, and none "
                         "has a finite value (the denoising score needs --loss-noises > 0)")


def judged_columns(cols: Mapping[str, np.ndarray], calibration: Calibration) -> dict[str, np.ndarray]:
    """Every DERIVED score and its standard error (`<name>_se`) for a table's rows: [rows] each
    (NaN where a row has no score, or no fit was possible)."""
    base, complexity = base_columns(cols), np.asarray(cols["complexity"], dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    z, z_se = [], []
    for name, of in CALIBRATED.items():
        values, se = base[of]
        fit = calibration.fits.get(of)
        resid = values - (fit.intercept + fit.slope * complexity) if fit else np.full_like(values, np.nan)
        out[name], out[f"{name}_se"] = resid, se
        z.append((resid - fit.median) / fit.scale if fit else np.full_like(values, np.nan))
        z_se.append(se / fit.scale if fit else np.full_like(values, np.nan))
    out["denoising_score"], out["denoising_score_se"] = base["denoising_score"]
    out["combined_score"] = (z[0] + z[1]) / math.sqrt(2)
    out["combined_score_se"] = np.sqrt(z_se[0] ** 2 + z_se[1] ** 2) / math.sqrt(2)
    return out


def judged(cols: Mapping[str, np.ndarray], name: str, calibration: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """The score `name` (one of JUDGED) and its standard error for a table's rows."""
    if name in DERIVED:
        out = judged_columns(cols, calibration)
        return out[name], out[f"{name}_se"]
    values = np.asarray(cols[name], dtype=np.float64)
    return values, np.asarray(cols[SE_OF[name]], dtype=np.float64) if SE_OF[name] in cols else np.full_like(values,
                                                                                                              np.nan)


NEEDED = ("log_volume_growth", "log_volume_growth_se", "logp", "window_volume_growth", "window_volume_growth_se",
          "denoising_loss", "denoising_loss_se", "complexity")  # the columns the scores are made from


def table_columns(table) -> dict[str, np.ndarray]:
    """The NEEDED columns of an Arrow score table as float64 arrays (NaN where null)."""
    return {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in NEEDED
            if c in table.column_names}


def fit_calibration(table, ok: np.ndarray, reference=None, reference_ok: np.ndarray | None = None) -> Calibration:
    """The calibration a run may fit: on the reference's ok rows when there is a reference, else
    robustly on the dataset's ok rows."""
    rows, mask, on = (reference, reference_ok, "reference") if reference is not None else (table, ok, "dataset")
    cols = table_columns(rows)
    return calibrate({c: v[mask] for c, v in cols.items()}, on)


@dataclass
class Judged:
    """The scores a run judges by: the fitted calibration, the judged score and its standard
    error per row (dataset and reference), and every derived score's column (JUDGED_SCHEMA)."""

    calibration: Calibration
    values: np.ndarray  # [rows] the judged score (NaN where not ok)
    se: np.ndarray  # [rows] its standard error
    columns: dict[str, list]  # JUDGED_SCHEMA columns of the dataset's rows
    reference: pa.Table | None  # the reference's table with its JUDGED_SCHEMA columns
    reference_values: np.ndarray | None  # the reference's ok rows' judged scores
    reference_se: np.ndarray | None = None  # and their standard errors

    def judge(self, cols: dict[str, np.ndarray], name: str) -> np.ndarray:
        """The judged score of other images (remediation's variants), with this calibration."""
        return judged(cols, name, self.calibration)[0]


def judge_scores(table: pa.Table, ok: np.ndarray, reference: pa.Table | None, name: str) -> Judged:
    """Fit the calibration (on the reference, else robustly on the dataset) and compute every
    derived score of the dataset and the reference."""
    ref_ok = ok_mask(reference) if reference is not None else None
    calibration = fit_calibration(table, ok, reference, ref_ok)
    if name in DERIVED:
        check_judgeable(name, calibration)
    cols = table_columns(table)
    values, se = judged(cols, name, calibration)
    derived = judged_columns(cols, calibration)
    columns = {f.name: [float(v) if o and np.isfinite(v) else None for v, o in zip(derived[f.name], ok)]
               for f in JUDGED_SCHEMA}
    ref_values = ref_se = None
    if reference is not None:
        ref_cols = table_columns(reference)
        ref_values, ref_se = (v[ref_ok] for v in judged(ref_cols, name, calibration))
        ref_derived = judged_columns(ref_cols, calibration)
        for f in JUDGED_SCHEMA:
            reference = reference.append_column(f, pa.array([float(v) if o and np.isfinite(v) else None
                                                             for v, o in zip(ref_derived[f.name], ref_ok)], f.type))
    return Judged(calibration, np.where(ok, values, np.nan), se, columns, reference, ref_values, ref_se)


def noise_ratio(j: Judged, ok: np.ndarray) -> float:
    """rms standard error of the judged score over its spread (1.4826 MAD) among the dataset's
    ok rows, the images a run ranks and flags: two seeds' rankings of them correlate about
    1 / (1 + ratio^2). NaN when the score has no standard error."""
    values, se = j.values[ok], j.se[ok]
    values, se = values[np.isfinite(values)], se[np.isfinite(se)]
    if not len(values) or not len(se):
        return float("nan")
    spread = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    return float(np.sqrt(np.mean(se**2)) / spread) if spread > 0 else float("inf")
