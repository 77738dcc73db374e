"""Which training pictures a model's generations copy (memclean verify).

The ratio test of Carlini et al. 2023 ("Extracting training data from diffusion models"), as
pipeline/tools/evaluate.memorized applies it: a generation g copies its nearest training picture
when, in the model's pixel space (L2),
    ||g - x_1|| < ratio * ||g - x_2||,
x_1 its nearest training image and x_2 the nearest one of another picture (ratio 1/3). Copies
of one picture are one picture (`groups`: exact copies share their pixel hash; a clean run's
duplicate clusters join near copies), so a generation that copies a duplicated image is not
excused by the duplicate beside it. The search is FAISS's exact L2 over the training set in
chunks of rows (each chunk's index at most CHUNK_BYTES), the queries in batches: memory bounded
by a chunk and the queries' k best, time linear in generations x training images; never a
generations x training matrix.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.fields import setting

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 20  # training rows per FAISS index: at most this many bytes of pixels
QUERY_BATCH = 1024  # generations searched at once
MAX_K = 2048  # the most neighbours a query keeps (a picture with more distinct copies: see nearest_distinct)


@dataclass(frozen=True)
class CopySettings:
    """What counts as a copy, and what the copies are held against."""

    copy_ratio: float = setting(1 / 3, "a generation copies its nearest training picture when it is closer (L2, "
                                "in the model's pixel space) than this share of its distance to the nearest other "
                                "picture (Carlini et al. 2023)")
    clean_output: str | None = setting(None, "a memclean clean output of the same training data (--data): its "
                                       "duplicate clusters count as one picture, and its flags and scores are "
                                       "held against what the model copies", aliases=("from",))
    reference: str | None = setting(None, "held-out images the model never saw: the chance reference of the "
                                    "similarity test's threshold (else the training set's own neighbours)")

    def __post_init__(self) -> None:
        if not 0 < self.copy_ratio < 1:
            raise ValueError(f"--copy-ratio is in (0, 1), got {self.copy_ratio}")


def read_copied(verify_output: str) -> dict[str, int]:
    """A memclean verify output's copied training images: {id: generations that copy its
    picture}. The output must be a finished verify run."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from pipeline.io.store import is_complete

    out = Path(verify_output)
    manifest = out / "manifest.json"
    kind = json.loads(manifest.read_text()).get("kind") if manifest.is_file() else None
    if not is_complete(out) or kind != "verify" or not (out / "copied.parquet").is_file():
        raise ValueError(f"--flag-copied {verify_output!r} is not a finished memclean verify output "
                         f"(kind {kind!r}; needs _COMPLETE and copied.parquet)")
    table = pq.read_table(out / "copied.parquet", columns=["id", "generations"])
    return dict(zip(table.column("id").to_pylist(), table.column("generations").to_pylist()))


def picture_groups(pixel_hashes: list[str], clusters: list[int | None] | None = None) -> np.ndarray:
    """Each training row's picture: its duplicate cluster when it has one (a clean run's), else
    its pixel hash (exact copies are one picture). -> [N] integer labels."""
    keys = [f"c{c}" if clusters is not None and c is not None else f"p{h}"
            for h, c in zip(pixel_hashes, clusters if clusters is not None else [None] * len(pixel_hashes))]
    _, labels = np.unique(np.array(keys, dtype=object), return_inverse=True)
    return labels.reshape(-1).astype(np.int64)


def nearest_distinct(queries: np.ndarray, train: np.ndarray, groups: np.ndarray,
                     distinct_rows: np.ndarray | None = None,
                     progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query [Q, D], the L2 distance to its nearest training row (train [N, D], may be
    memory-mapped), the distance to the nearest row of another picture (`groups` [N]; inf when
    there is none) and the nearest row. `distinct_rows`: the rows to search (one per exact copy
    suffices: copies are at equal distances), default all. Exact: each query keeps its k nearest,
    k = 1 + the most rows one picture has (capped at MAX_K, with a warning), so that the nearest
    other picture is always among them."""
    import faiss

    rows = np.arange(len(train)) if distinct_rows is None else np.asarray(distinct_rows, np.int64)
    n, d = len(rows), train.shape[1]
    q = len(queries)
    if n == 0:
        return np.full(q, np.inf), np.full(q, np.inf), np.full(q, -1, np.int64)
    k = int(min(n, 1 + np.bincount(groups[rows]).max()))
    if k > MAX_K:
        log.warning("a training picture has %d distinct copies: each generation keeps its %d nearest, and the nearest "
                    "other picture may be beyond them (its distance then overstated)", k - 1, MAX_K)
        k = MAX_K
    best_d = np.full((q, k), np.inf, np.float32)
    best_r = np.full((q, k), -1, np.int64)
    step = max(1, CHUNK_BYTES // (4 * d))
    for s in range(0, n, step):
        chunk = rows[s:s + step]
        index = faiss.IndexFlatL2(d)
        index.add(np.ascontiguousarray(train[chunk], dtype=np.float32))
        kk = min(k, len(chunk))
        for b in range(0, q, QUERY_BATCH):
            dist, idx = index.search(np.ascontiguousarray(queries[b:b + QUERY_BATCH], dtype=np.float32), kk)
            found = np.where(idx >= 0, chunk[np.maximum(idx, 0)], -1)
            merged_d = np.concatenate([best_d[b:b + QUERY_BATCH], dist], 1)
            merged_r = np.concatenate([best_r[b:b + QUERY_BATCH], found], 1)
            order = np.argsort(merged_d, axis=1, kind="stable")[:, :k]
            best_d[b:b + QUERY_BATCH] = np.take_along_axis(merged_d, order, 1)
            best_r[b:b + QUERY_BATCH] = np.take_along_axis(merged_r, order, 1)
        if progress:
            progress(len(chunk))
    # FAISS's squared distances (float32: rounding of ||q||^2 + ||x||^2 - 2 q.x can dip below 0)
    dist = np.sqrt(np.maximum(best_d.astype(np.float64), 0))
    g = np.where(best_r >= 0, groups[np.maximum(best_r, 0)], -1)
    other = (g != g[:, :1]) & (best_r >= 0)
    first_other = np.argmax(other, axis=1)
    d2 = np.where(other.any(1), dist[np.arange(q), first_other], np.inf)
    return dist[:, 0], d2, best_r[:, 0]


def ratio_test(d1: np.ndarray, d2: np.ndarray, ratio: float) -> np.ndarray:
    """Carlini et al.'s test: d1 < ratio * d2 (a lone picture, d2 = inf: any finite d1 passes)."""
    return np.asarray(d1) < ratio * np.asarray(d2)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k / n (Wilson 1927): sound at 0 and n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
