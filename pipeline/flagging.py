"""Threshold policies: which scores count as high risk.

Every policy turns a sample of scores into one `Threshold`; an image is flagged when its score
is strictly above it. Policies share one signature and are chosen by name from POLICIES.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np


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
    if not 0 < q < 1:
        raise ValueError(f"--flag-quantile must lie in (0, 1), got {q}")
    s = _finite(scores, "dataset")
    return Threshold(float(np.quantile(s, q)), "quantile", {"q": q}, {"n": int(s.size)})


def reference_threshold(reference: np.ndarray, fpr: float, confidence: float = 0.95) -> Threshold:
    """The (1 - A) quantile of scores of images the model never saw (a held-out split).

    About A of unmemorized images score above it. Its confidence interval comes from order
    statistics: the number of reference scores below the true quantile is Binomial(n, 1 - A),
    so the ranks of its (1 -/+ confidence) / 2 quantiles bracket the threshold.
    """
    from scipy.stats import binom

    if not 0 < fpr < 1:
        raise ValueError(f"--flag-fpr must lie in (0, 1), got {fpr}")
    s = np.sort(_finite(reference, "reference"))
    n = s.size
    lo_rank, hi_rank = binom.ppf([(1 - confidence) / 2, (1 + confidence) / 2], n, 1 - fpr).astype(int)
    ci = [float(s[max(lo_rank - 1, 0)]), float(s[min(hi_rank, n - 1)])]
    details = {"n_reference": n, "ci": ci, "confidence": confidence}
    if n * fpr < 5:
        details["warning"] = f"only {n} reference scores: about {n * fpr:.1f} lie above a {fpr} tail"
    return Threshold(float(np.quantile(s, 1 - fpr)), "reference_fpr", {"fpr": fpr}, details)


def zscore_threshold(scores: np.ndarray, z: float) -> Threshold:
    """median + z * 1.4826 MAD of the dataset's scores (a robust z-score above z)."""
    s = _finite(scores, "dataset")
    med = float(np.median(s))
    scale = 1.4826 * float(np.median(np.abs(s - med)))
    if scale == 0:
        raise ValueError("the scores' median absolute deviation is 0: --flag-zscore cannot scale them")
    return Threshold(med + z * scale, "robust_zscore", {"z": z}, {"median": med, "scale": scale, "n": int(s.size)})


def absolute_threshold(value: float) -> Threshold:
    """A fixed threshold, e.g. carried over from an earlier run's manifest."""
    if not np.isfinite(value):
        raise ValueError(f"--flag-threshold must be finite, got {value}")
    return Threshold(float(value), "absolute", {"value": float(value)})


POLICIES: dict[str, Callable[..., Threshold]] = {
    "quantile": quantile_threshold,
    "reference_fpr": reference_threshold,
    "robust_zscore": zscore_threshold,
    "absolute": absolute_threshold,
}


@dataclass(frozen=True)
class FlagSettings:
    """Which policy sets the threshold; at most one of the optional ones may be given."""

    quantile: float = 0.95  # default policy: flag above this quantile of the dataset
    fpr: float | None = None  # with a reference: flag above its (1 - fpr) quantile
    zscore: float | None = None  # flag above median + z * 1.4826 MAD
    threshold: float | None = None  # flag above this absolute value

    def policy(self, has_reference: bool) -> str:
        chosen = [name for name, v in (("robust_zscore", self.zscore), ("absolute", self.threshold)) if v is not None]
        if self.fpr is not None and not has_reference:
            raise ValueError("--flag-fpr needs --reference: held-out images to calibrate against")
        if has_reference:
            chosen.append("reference_fpr")
        if len(chosen) > 1:
            raise ValueError(f"choose one flagging policy, got {chosen} (--reference, --flag-zscore, --flag-threshold)")
        return chosen[0] if chosen else "quantile"

    def threshold_for(self, scores: np.ndarray, reference: np.ndarray | None) -> Threshold:
        """The threshold of the chosen policy, from POLICIES."""
        policy = self.policy(reference is not None)
        args = {"reference_fpr": (reference, 0.05 if self.fpr is None else self.fpr),
                "robust_zscore": (scores, self.zscore), "absolute": (self.threshold,),
                "quantile": (scores, self.quantile)}[policy]
        return POLICIES[policy](*args)


def flag(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Boolean mask of scores strictly above the threshold (NaN is never flagged)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.greater(scores, threshold.value, where=np.isfinite(scores), out=np.zeros(scores.shape, bool))
