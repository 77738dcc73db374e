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


POLICIES: dict[str, Callable[..., Threshold]] = {
    "quantile": quantile_threshold,
}


def flag(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """Boolean mask of scores strictly above the threshold (NaN is never flagged)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.greater(scores, threshold.value, where=np.isfinite(scores), out=np.zeros(scores.shape, bool))
