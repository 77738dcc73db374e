"""Threshold policies: which scores count as high risk.

Every policy turns a sample of scores into one `Threshold`. The one rule, used everywhere: an
image is flagged when its score is strictly above the threshold (`flag`); an augmented variant
is accepted when it would not be flagged and lies in the band of ordinary unmemorized images,
at or above a low quantile of their scores (`accept`). Policies share one signature and are
chosen by name from POLICIES.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline.decide.scores import JUDGED
from pipeline.fields import setting

log = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.95  # the quantile policy's q when no policy is named
DEFAULT_FPR = 0.05  # the reference policy's A when --flag-fpr is not given


@dataclass(frozen=True)
class Threshold:
    """A flagging threshold and how it was set."""

    value: float  # flag scores strictly above this
    policy: str  # the policy's name
    parameters: dict[str, Any] = field(default_factory=dict)  # what the policy was given
    details: dict[str, Any] = field(default_factory=dict)  # what it found (e.g. sample sizes)

    def reason(self, score: float, score_name: str) -> str:
        """Why an image with `score` is flagged, for people."""
        params = ", ".join(f"{k}={v}" for k, v in self.parameters.items())
        return f"{score_name} {score:.4g} > {self.value:.4g} ({self.policy}: {params})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError(f"no finite {what} scores to set a threshold from")
    return scores


def quantile_threshold(scores: np.ndarray, q: float) -> Threshold:
    """The q quantile of the dataset's own scores: about (1 - q) of the images are flagged."""
    s = _finite(scores, "dataset")
    return Threshold(float(np.quantile(s, q)), "quantile", {"q": q}, {"n": int(s.size)})


def order_statistic_ranks(n: int, q: float, confidence: float) -> tuple[int, int]:
    """1-based ranks (r, s) with P(X_(r) <= xi_q <= X_(s)) >= confidence for n continuous samples.

    B = #{X_i <= xi_q} ~ Binomial(n, q), X_(r) <= xi_q iff B >= r and X_(s) >= xi_q iff B <= s - 1,
    so r - 1 is the largest k with P(B <= k) <= (1 - confidence) / 2 and s - 1 the smallest with
    P(B <= k) >= (1 + confidence) / 2. r = 0 or s = n + 1: the sample cannot bound that end.
    """
    from scipy.stats import binom

    alpha = 1 - confidence
    cdf = binom.cdf(np.arange(n + 1), n, q)  # P(B <= k), k = 0..n
    r = int(np.searchsorted(cdf, alpha / 2, side="right"))  # count of k with cdf(k) <= alpha/2
    s = int(np.searchsorted(cdf, 1 - alpha / 2, side="left")) + 1
    return r, s


def reference_threshold(reference: np.ndarray, fpr: float, confidence: float = 0.95) -> Threshold:
    """The (1 - A) quantile of scores of images the model never saw (a held-out split).

    About A of unmemorized images score above it. Its confidence interval is exact (order
    statistics, `order_statistic_ranks`); an end the sample cannot bound is null (unbounded),
    and a reference too small for A is warned about, with the size it would take.
    """
    s = np.sort(_finite(reference, "reference"))
    n = s.size
    r, k = order_statistic_ranks(n, 1 - fpr, confidence)
    ci = [float(s[r - 1]) if r >= 1 else None, float(s[k - 1]) if k <= n else None]
    details: dict[str, Any] = {"n_reference": n, "ci": ci, "confidence": confidence}
    needed = math.ceil(math.log((1 - confidence) / 2) / math.log(1 - fpr))  # (1 - A)^n <= alpha / 2
    if ci[1] is None or n * fpr < 5:
        details["warning"] = (f"{n} reference images are too few for --flag-fpr {fpr}: about {n * fpr:.1f} lie above "
                              f"the threshold (5 or more take {math.ceil(5 / fpr)} images)"
                              + (f", and its {confidence:.0%} interval is unbounded above ({needed} images would "
                                 "bound it)" if ci[1] is None else ""))
        log.warning("%s", details["warning"])
    return Threshold(float(np.quantile(s, 1 - fpr)), "reference_fpr", {"fpr": fpr}, details)


def zscore_threshold(scores: np.ndarray, z: float) -> Threshold:
    """median + z * 1.4826 MAD of the dataset's scores (a robust z-score above z)."""
    s = _finite(scores, "dataset")
    med = float(np.median(s))
    scale = 1.4826 * float(np.median(np.abs(s - med)))
    if scale == 0:
        raise ValueError("the scores' median absolute deviation is 0: --flag-zscore cannot scale them")
    return Threshold(med + z * scale, "robust_zscore", {"z": z}, {"median": med, "scale": scale, "n": int(s.size)})


def absolute_threshold(scores: np.ndarray, value: float) -> Threshold:
    """A fixed threshold, e.g. carried over from an earlier run's manifest (the scores unread)."""
    return Threshold(float(value), "absolute", {"value": float(value)})


@dataclass(frozen=True)
class Policy:
    """A flagging policy: the FlagSettings field (and option) that names it, its parameter's
    default and valid values, the sample it reads, and the threshold it makes. Every policy
    has one signature, threshold(sample, parameter) -> Threshold; values are validated once,
    when FlagSettings is built, not again by the policy."""

    option: str  # the FlagSettings field giving the parameter
    named_by: str  # the FlagSettings field whose presence chooses the policy
    default: float | None  # the parameter when the option is not given
    valid: Callable[[float], bool]  # what the parameter must satisfy ...
    allowed: str  # ... in words, for the error
    sample: str  # the scores it reads: dataset or reference
    threshold: Callable[[np.ndarray, float], Threshold]


def _unit(v: float) -> bool:
    return 0 < v < 1


POLICIES: dict[str, Policy] = {
    "reference_fpr": Policy("fpr", "reference", DEFAULT_FPR, _unit, "in (0, 1)", "reference", reference_threshold),
    "quantile": Policy("quantile", "quantile", DEFAULT_QUANTILE, _unit, "in (0, 1)", "dataset", quantile_threshold),
    "robust_zscore": Policy("zscore", "zscore", None, math.isfinite, "finite", "dataset", zscore_threshold),
    "absolute": Policy("threshold", "threshold", None, math.isfinite, "finite", "dataset", absolute_threshold),
}
DEFAULT_POLICY = "quantile"  # when none is named


SCORE_CHOICES = JUDGED  # the scores a threshold can judge (decide/scores.py)


@dataclass(frozen=True)
class FlagSettings:
    """Which policy sets the threshold (on the judged score: decide/scores.py JudgeSettings): at
    most one policy may be named; none means the quantile policy at DEFAULT_QUANTILE. Every value
    is checked when this is built."""

    reference: str | None = setting(None, "held-out images the model never saw: flag above their (1 - A) quantile")
    fpr: float | None = setting(None, f"A, the share of unmemorized images flagged, with --reference "
                                f"(default {DEFAULT_FPR})", name="flag_fpr")
    quantile: float | None = setting(None, f"flag above this quantile of the dataset's own scores (the policy when "
                                     f"none is named, at {DEFAULT_QUANTILE})", name="flag_quantile")
    zscore: float | None = setting(None, "flag above median + Z * 1.4826 MAD of the dataset's scores",
                                   name="flag_zscore")
    threshold: float | None = setting(None, "flag above this absolute score (e.g. an earlier run's manifest "
                                      "threshold)", name="flag_threshold")
    copied: str | None = setting(None, "a memclean verify output: the training images its model's generations copy "
                                 "are flagged too, whatever their score (beside the policy)", name="flag_copied")

    def __post_init__(self) -> None:
        for p in POLICIES.values():
            value = getattr(self, p.option)
            if value is not None and not p.valid(value):
                raise ValueError(f"--flag-{p.option} must be {p.allowed}, got {value}")
        self.policy()

    def policy(self) -> str:
        """The one policy named (validated): reference_fpr, quantile, robust_zscore or absolute."""
        if self.fpr is not None and self.reference is None:
            raise ValueError("--flag-fpr needs --reference: held-out images to calibrate against")
        chosen = [name for name, p in POLICIES.items() if getattr(self, p.named_by) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose one flagging policy, got {chosen} (--reference [--flag-fpr], "
                             "--flag-quantile, --flag-zscore, --flag-threshold)")
        return chosen[0] if chosen else DEFAULT_POLICY

    def threshold_for(self, scores: np.ndarray, reference: np.ndarray | None) -> Threshold:
        """The chosen policy's threshold (scores: the dataset's; reference: the held-out scores)."""
        name = self.policy()
        p = POLICIES[name]
        if p.sample == "reference" and reference is None:
            raise ValueError("the reference policy needs the reference's scores")
        value = getattr(self, p.option)
        return p.threshold(reference if p.sample == "reference" else scores, p.default if value is None else value)


def flag(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Boolean mask of scores strictly above the threshold (NaN is never flagged)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.greater(scores, threshold.value, where=np.isfinite(scores), out=np.zeros(scores.shape, bool))


def accept(scores: np.ndarray, threshold: Threshold, low: float | None) -> np.ndarray:
    """Boolean mask of scores that are finite, not flagged, and at or above the band's low end."""
    scores = np.asarray(scores, dtype=np.float64)
    inside = np.isfinite(scores) & ~flag(scores, threshold)
    return inside if low is None else inside & (scores >= low)


def band_low(scores: np.ndarray, q: float) -> float | None:
    """The accept band's low end: the q quantile of ordinary unmemorized images' scores (the
    reference's, or the dataset's without one); None for q = 0 (no low end)."""
    if q == 0:
        return None
    return float(np.quantile(_finite(scores, "band"), q))
