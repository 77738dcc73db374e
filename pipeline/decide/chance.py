"""The similarity unrelated images reach by chance, and a duplicate threshold set above it
(`--dup-threshold auto`).

A held-out image is no copy of a training image, so the similarity of each reference image to
its most similar training image is a draw from what chance gives an image with no copy in the
dataset. Without a reference, each image's similarity to its most similar other image (exact
copies, equal pixels, left out: they are joined by their hash) is such a draw for the unique
images, and a high one for near copies.

The nearest-neighbour similarity is the largest of many similarities, so on Fisher's scale
z = atanh(s) (where a correlation of unrelated images is close to normal) it follows a Gumbel
law for maxima, F(z) = exp(-exp(-(z - mu) / beta)). mu and beta are fitted on the sample's
lower quartile and median, which stay on chance's side while up to half of the sample are
copies (the dataset case); the threshold is the law's (1 - rate) quantile, so an image with no
copy is joined to another by chance with probability about `rate` (--dup-false-join-rate), and
never below the embedder's floor. The maximum of normal draws has a lighter upper tail than
its Gumbel limit, so the fitted quantile errs high: fewer false joins than `rate`, not more.

Reference images at or above the threshold are themselves a finding: the reference holds a copy
of a training image (it is contaminated); they are reported and the fit is made again without
them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.decide.neighbours import nearest_similarity

log = logging.getLogger(__name__)

SAMPLE = 2000  # images whose nearest neighbour is searched: the chance level's sample
CANDIDATES = 16  # nearest search-view candidates per image, compared by the embedder's similarity
QUANTILES = (0.5, 0.9, 0.99, 1.0)  # of the chance sample, in the manifest
# -ln(-ln p) at p = 1/4 and 1/2: the Gumbel quantiles the fit uses, in units of beta about mu
_Q25, _Q50 = -np.log(-np.log(0.25)), -np.log(-np.log(0.5))
MIN_SAMPLE = 20  # fewer draws than this: the embedder's default threshold, not a fit
Z_MAX = float(np.arctanh(0.999999))  # similarities of 1 (equal thumbnails) clipped to this on Fisher's scale


@dataclass
class ChanceThreshold:
    """The duplicate threshold a run used and, when it was set by chance, how."""

    value: float
    mode: str  # auto | given
    source: str | None = None  # reference | dataset (what the chance sample is), or None when given
    rate: float | None = None  # the false-join rate asked for
    floor: float | None = None  # the embedder's floor
    fitted: float | None = None  # the Gumbel quantile before the floor
    sample: int = 0  # draws in the fit (those left when copies were trimmed)
    draws: int = 0  # draws measured
    mu: float | None = None
    beta: float | None = None
    quantiles: dict[str, float] = field(default_factory=dict)  # of the sample's similarities
    contaminated: list[dict[str, Any]] = field(default_factory=list)  # reference images with a copy in the dataset
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("value", "mode", "source", "rate", "floor", "fitted", "sample", "draws",
                                             "mu", "beta", "quantiles", "note")}
        out["contaminated_reference"] = len(self.contaminated)
        out["contaminated_examples"] = self.contaminated[:20]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChanceThreshold":
        """The threshold as a manifest recorded it (to_dict; the contaminated examples only)."""
        names = ("value", "mode", "source", "rate", "floor", "fitted", "sample", "draws", "mu", "beta", "quantiles",
                 "note")
        return cls(**{k: d[k] for k in names if d.get(k) is not None},
                   contaminated=list(d.get("contaminated_examples") or []))


def gumbel_fit(similarities: np.ndarray) -> tuple[float, float]:
    """(mu, beta) of the Gumbel law for maxima on z = atanh(s), from the lower quartile and the
    median of the draws; beta is at least 1e-6 (a sample of equal draws)."""
    z = np.arctanh(np.clip(np.asarray(similarities, np.float64), -np.tanh(Z_MAX), np.tanh(Z_MAX)))
    q25, q50 = np.quantile(z, [0.25, 0.5])
    beta = max(float(q50 - q25) / (_Q50 - _Q25), 1e-6)
    mu = float(q50 - beta * _Q50)
    return mu, beta


def gumbel_quantile(mu: float, beta: float, p: float) -> float:
    """The similarity at the law's p quantile (back from Fisher's scale)."""
    return float(np.tanh(mu - beta * np.log(-np.log(p))))


def chance_threshold(similarities: np.ndarray, rate: float, floor: float, source: str,
                     default: float | None = None, rounds: int = 5) -> ChanceThreshold:
    """The (1 - rate) quantile of the Gumbel law fitted to chance's nearest-neighbour
    similarities, at least `floor`. Draws at or above the quantile are copies, not chance: they
    are left out and the law fitted again, until none is (at most `rounds` fits). Flat images
    (similarity -1: no structure to compare) are no draws. Fewer than MIN_SAMPLE draws: the
    embedder's `default` (else the floor), with a note."""
    s = np.asarray(similarities, np.float64)
    s = s[np.isfinite(s) & (s > -1 + 1e-6)]
    q = {f"{p:g}": round(float(np.quantile(s, p)), 6) for p in QUANTILES} if len(s) else {}
    if len(s) < MIN_SAMPLE:
        value = max(floor, default if default is not None else floor)
        note = f"{len(s)} draws of chance (fewer than {MIN_SAMPLE}): the embedder's default {value:g} is used"
        return ChanceThreshold(value, "auto", source, rate, floor, None, len(s), len(s), quantiles=q, note=note)
    draws = s
    for _ in range(rounds):
        mu, beta = gumbel_fit(draws)
        fitted = gumbel_quantile(mu, beta, 1 - rate)
        below = draws[draws < fitted]
        if len(below) == len(draws) or len(below) < MIN_SAMPLE:
            break
        draws = below
    note = None
    if fitted > 0.999:
        note = (f"unrelated images here reach similarity {fitted:.4f} by chance at rate {rate:g}: near copies cannot "
                "be told from look-alikes, and only closer pairs are joined")
        log.warning("duplicate threshold: %s", note)
    return ChanceThreshold(max(fitted, floor), "auto", source, rate, floor, round(fitted, 6), len(draws), len(s),
                           round(mu, 6), round(beta, 6), q, note=note)


def sample_rows(keys: Sequence[str | None], n: int = SAMPLE) -> np.ndarray:
    """Up to n rows, one per distinct key (a pixel hash; may be an Arrow array), chosen as the
    n smallest keys: the same images whatever the input's order, and a uniform draw, keys being
    hashes. Only the chosen rows' keys become Python strings."""
    arr = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(list(keys), pa.string())
    distinct = pc.drop_null(pc.unique(arr))
    chosen = pc.take(distinct, pc.array_sort_indices(distinct)[:n])
    rows = np.flatnonzero(pc.is_in(arr, value_set=chosen).to_numpy(zero_copy_only=False))
    first: dict[str, int] = {}
    for r, k in zip(rows.tolist(), arr.take(pa.array(rows, pa.int64())).to_pylist()):
        first.setdefault(k, r)
    return np.array(sorted(first.values()), dtype=np.int64)


def threshold_by_chance(vectors: np.ndarray, keys: Sequence[str | None], index, views: np.ndarray, embedder,
                        rate: float, reference: np.ndarray | None = None, reference_ids: Sequence[str] | None = None,
                        ids: Sequence[str] | None = None, sample: int = SAMPLE) -> ChanceThreshold:
    """--dup-threshold auto: the chance level measured on the reference's images against the
    dataset (`vectors`, searched in `index` over their search `views`) when there is a
    reference, else on a sample of the dataset's own images (one per pixel hash, `keys`), and
    the threshold above it (chance_threshold). Reference images at or above it are listed as
    contaminated (with the training image they match, by `ids`) and left out of the fit."""
    floor, default = embedder.threshold_floor, embedder.default_threshold
    # the pixel embedder's colour check vetoes pairs: its draws are grey similarities, those of
    # pairs whose colours agree first (embeddings.PixelEmbedder.for_chance)
    embedder = embedder.for_chance() if hasattr(embedder, "for_chance") else embedder
    draws = getattr(embedder, "chance_draws", lambda sim: sim)
    if reference is not None and len(reference):
        rows = np.arange(min(len(reference), 5 * sample))  # every reference image, up to 5 samples' worth
        match, sim = nearest_similarity(reference[rows], None, index, vectors, None, embedder)
        sim = draws(sim)
        t = chance_threshold(sim, rate, floor, "reference", default)
        hit = np.flatnonzero(sim >= t.value)
        if len(hit):
            t = chance_threshold(np.delete(sim, hit), rate, floor, "reference", default)
            hit = np.flatnonzero(sim >= t.value)
            order = hit[np.argsort(-sim[hit], kind="stable")]
            t.contaminated = [{"reference": str(reference_ids[int(rows[i])]) if reference_ids is not None else int(rows[i]),
                               "training": str(ids[int(match[i])]) if ids is not None else int(match[i]),
                               "similarity": round(float(sim[i]), 6)} for i in order]
            log.warning("%d reference images duplicate a training image (at or above %.4f); they are left out of "
                        "the duplicate threshold: %s", len(hit), t.value, t.contaminated[:5])
        return t
    rows = sample_rows(keys, sample)
    query_keys = keys.take(pa.array(rows, pa.int64())).to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) \
        else [keys[int(r)] for r in rows]
    _, sim = nearest_similarity(vectors[rows], query_keys, index, vectors, keys, embedder, query_views=views[rows])
    return chance_threshold(draws(sim), rate, floor, "dataset", default)


def given_threshold(value: float) -> ChanceThreshold:
    """A threshold the user gave (--dup-threshold 0.95)."""
    return ChanceThreshold(float(value), "given")
