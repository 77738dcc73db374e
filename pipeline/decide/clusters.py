"""Duplicate clusters: exact copies by pixel hash, near copies by neighbour search, union-find,
and each cluster's keeper.

Exact duplicates (equal decoded-pixel hashes) are joined first; near duplicates are pairs whose
similarity (the embedder's, verified on the candidates FAISS finds at its search view) is at
least the threshold. The keeper of a cluster is its lowest-risk member, ties by id.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.decide.index import build_index, search_views
from pipeline.decide.neighbours import near_matches, range_pairs
from pipeline.fields import setting

log = logging.getLogger(__name__)

THRESHOLD_MEANING = ("cosine similarity of the embeddings (pixel: min(correlation, 1 - (1 - detail correlation) / 2) "
                     "of 32x32 blurred grey thumbnails, aligned over zooms of +-5% and shifts of up to 1/32 of the "
                     "image or one image pixel, whichever is larger); pairs at or above it are duplicates")


@dataclass(frozen=True)
class DedupSettings:
    """How duplicates are found."""

    embedder: str = setting("pixel", "pixel (model-free, default), unet (the model's own features) or "
                            "torchscript:PATH (a local TorchScript model, e.g. SSCD)")
    embed_size: int = setting(224, "torchscript embedders: input side")
    dup_threshold: float | str = setting("auto", "auto: above the similarity unrelated images reach by chance (the "
                                         "reference against the dataset, else the dataset's own nearest "
                                         "neighbours; decide/chance.py) at --dup-false-join-rate, never below the "
                                         "embedder's floor (pixel 0.9, unet 0.9, torchscript 0.6); or a number: "
                                         "the cosine similarity at or above which two images are duplicates")
    dup_false_join_rate: float = setting(0.005, "--dup-threshold auto: the chance, for an image with no copy, of "
                                         "being joined to another image")
    dedup_flip: bool = setting(False, "also match horizontally mirrored copies")
    against: str | None = setting(None, "earlier memclean outputs (one folder, several separated by commas, or a "
                                  "dataset catalog dataset.json or its folder: every accepted part): new images that "
                                  "duplicate their kept images are dropped")

    def __post_init__(self) -> None:
        value = self.dup_threshold
        if value is None or value == "auto":
            object.__setattr__(self, "dup_threshold", "auto")
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"--dup-threshold is auto or a cosine similarity in [-1, 1], got {value!r}") from None
            if not -1 <= number <= 1:
                raise ValueError(f"--dup-threshold is a cosine similarity in [-1, 1], got {value}")
            object.__setattr__(self, "dup_threshold", number)
        if not 0 < self.dup_false_join_rate < 0.5:
            raise ValueError(f"--dup-false-join-rate is a probability in (0, 0.5), got {self.dup_false_join_rate}")
        if self.embed_size < 1:
            raise ValueError(f"--embed-size must be positive, got {self.embed_size}")

    @property
    def auto(self) -> bool:
        """Whether the threshold is set by chance (decide/chance.py) rather than given."""
        return self.dup_threshold == "auto"


def duplicate_columns(vectors: np.ndarray, flipped: np.ndarray | None, ids: Sequence[str],
                      hashes: Sequence[str | None], risk: np.ndarray, ok: np.ndarray, threshold: float,
                      embedder, index, views: np.ndarray | None = None) -> dict[str, list]:
    """dup_cluster, dup_of (the cluster's keeper) and dup_similarity for every row; vectors,
    flipped, views and the index are over the ok rows, in order. ids and hashes may be Arrow
    arrays (a score table's columns): only clustered rows' ids become Python strings."""
    n = len(ok)
    cols: dict[str, list] = {"dup_cluster": [None] * n, "dup_of": [None] * n, "dup_similarity": [None] * n}
    rows = np.flatnonzero(ok)
    if not len(rows):
        return cols
    every = len(rows) == n  # every row ok: the columns themselves, not copies
    c = find_clusters(vectors, hashes if every else _take(hashes, rows), risk[rows], ids if every else _take(ids, rows),
                      threshold, embedder, flipped, index, views)
    clustered = np.flatnonzero(c.cluster >= 0)
    names = _strings(ids, rows[c.keeper[clustered]])
    for k in clustered.tolist():
        r, keeper = int(rows[k]), int(rows[c.keeper[k]])
        cols["dup_cluster"][r] = int(c.cluster[k])
        cols["dup_similarity"][r] = float(c.best_similarity[k])
        cols["dup_of"][r] = names[keeper] if keeper != r else None
    return cols


def _take(values: Sequence, rows: np.ndarray) -> Sequence:
    """values[rows], for a list or an Arrow array (an Arrow array again)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.take(pa.array(rows, pa.int64()))
    return [values[r] for r in rows]


def mark_earlier_duplicates(cols: dict[str, list], ok: np.ndarray, vectors: np.ndarray, earlier_names: list[str],
                            earlier: np.ndarray, threshold: float, embedder, device: str = "cpu",
                            views: np.ndarray | None = None) -> None:
    """Point dup_of of each ok row that duplicates an earlier output's kept image (and no image
    of its own cluster) at its name (`output:id`). views: the vectors' search views, when computed."""
    rows = np.where(ok)[0]
    match, sim = near_matches(vectors, earlier, threshold, embedder, device, views)
    for k, r in enumerate(rows):
        if match[k] >= 0 and cols["dup_of"][r] is None:
            cols["dup_of"][r] = earlier_names[match[k]]
            cols["dup_similarity"][r] = float(sim[k])


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return int(i)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def roots(self) -> np.ndarray:
        """The root of every element, by pointer jumping over the whole array: [n] int64."""
        p = self.parent
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return q
            p = q


@dataclass
class Clusters:
    """Duplicate clusters over N rows; singletons have cluster -1."""

    cluster: np.ndarray  # [N] int64 cluster number, -1 for images with no duplicate
    keeper: np.ndarray  # [N] int64 row of the cluster's keeper, -1 for singletons
    best_similarity: np.ndarray  # [N] float32 highest similarity to another member (1 for exact)
    pairs: int  # near-duplicate pairs found

    @property
    def count(self) -> int:
        return int(self.cluster.max() + 1) if len(self.cluster) else 0


def find_clusters(vectors: np.ndarray, pixel_hashes: Sequence[str | None], risk: np.ndarray,
                  ids: Sequence[str], threshold: float, embedder,
                  flipped: np.ndarray | None = None, index=None, views: np.ndarray | None = None) -> Clusters:
    """Cluster rows whose embeddings are duplicates (embedder.similarity >= threshold, also of
    the mirrored image when `flipped` embeddings are given) or whose pixel hashes are equal.
    Candidates come from a range search of embedder.search_view vectors (`views`, when they
    were computed already; in `index` when it is given, built over them). The keeper of each
    cluster is its lowest-risk member, ties by id. ids and pixel_hashes may be Arrow arrays:
    only the rows in clusters become Python strings."""
    n = len(vectors)
    uf = UnionFind(n)
    best = np.zeros(n, dtype=np.float32)
    for first, copies in _equal_groups(pixel_hashes):
        for i in copies:
            uf.union(first, int(i))
        best[first] = 1.0
        best[copies] = 1.0
    pairs = 0
    if n > 1:
        views = views if views is not None else search_views(vectors, embedder.search_view)
        index = index if index is not None else build_index(views)
        for queries in (vectors, flipped):
            if queries is not None:
                q_views = views if queries is vectors else search_views(queries, embedder.search_view)
                pairs += _join_near(uf, best, index, queries, q_views, vectors, threshold, embedder)
    return _label(uf, risk, ids, best, pairs)


def _equal_groups(values: Sequence[str | None]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, the later rows) of each value that occurs more than once; nulls never match.
    Rows are grouped by a 64-bit key of each value (_string_keys: 8 bytes a row, from the
    strings' first bytes gathered a block at a time, not a copy of the column), and rows whose keys are equal are split by their values themselves, so a
    key collision never joins different values."""
    if isinstance(values, pa.Array):
        values = pa.chunked_array([values])
    elif not isinstance(values, pa.ChunkedArray):
        values = pa.chunked_array([pa.array(list(values), pa.string())], pa.string())
    keys, valid = _string_keys(values)
    rows = np.flatnonzero(valid)
    order = rows[np.argsort(keys[rows], kind="stable")]  # equal keys: rows in increasing order
    del rows
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # runs of equal keys
    runs = np.diff(np.r_[starts, len(order)])
    members = order[np.repeat(runs > 1, runs)]  # the rows of every run of two or more, run after run
    lengths = runs[runs > 1]
    names = values.take(pa.array(members, pa.int64())).to_pylist()  # only rows of a group become strings
    at = 0
    for length in lengths.tolist():
        by_value: dict[str, list[int]] = {}
        for row, value in zip(members[at:at + length].tolist(), names[at:at + length]):
            by_value.setdefault(value, []).append(row)
        at += length
        for same in sorted(by_value.values()):
            if len(same) > 1:
                yield same[0], np.array(same[1:], np.int64)


KEY_BYTES = 16  # bytes of a value that make its key (a hex digest's first 64 bits)
KEY_BLOCK = 65536  # rows whose leading bytes are gathered at once (an index of 128 bytes a row)


def _string_keys(values: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit key of every row (the first KEY_BYTES bytes of its string mixed into one word,
    read from Arrow's own buffers a chunk at a time; dictionary codes where some value is
    shorter) and which rows are not null: [n] uint64, [n] bool."""
    n = len(values)
    keys, valid = np.zeros(n, np.uint64), np.zeros(n, bool)
    pos = 0
    for chunk in values.chunks:
        m = len(chunk)
        if not m:  # an empty chunk may have no offsets buffer at all
            continue
        chunk = chunk.cast(pa.string()) if chunk.type != pa.string() else chunk
        ok = chunk.is_valid().to_numpy(zero_copy_only=False)
        _, offsets, data = chunk.buffers()
        starts = np.frombuffer(offsets, np.int32, m + 1, chunk.offset * 4)
        rows = np.flatnonzero(ok)
        if len(rows) and (np.diff(starts)[rows] < KEY_BYTES).any():  # short values: exact codes instead
            codes = pc.dictionary_encode(values.combine_chunks()).indices
            return pc.fill_null(codes, 0).to_numpy(zero_copy_only=False).astype(np.uint64), \
                values.is_valid().to_numpy(zero_copy_only=False)
        buf = np.frombuffer(data, np.uint8) if len(rows) else None
        for b in range(0, len(rows), KEY_BLOCK):  # a block of rows' leading bytes at a time
            block = rows[b:b + KEY_BLOCK]
            raw = buf[starts[block][:, None] + np.arange(KEY_BYTES)]
            words = np.ascontiguousarray(raw).view(np.uint64)  # [k, 2]
            keys[pos + block] = words[:, 0] ^ (words[:, 1] * np.uint64(0x9E3779B97F4A7C15))
        valid[pos:pos + m] = ok
        pos += m
    return keys, valid


def _join_near(uf: UnionFind, best: np.ndarray, index, queries: np.ndarray, q_views: np.ndarray,
               vectors: np.ndarray, threshold: float, embedder) -> int:
    """Union every verified pair (query row, index row); returns how many were joined.
    q_views: the queries' search views."""
    joined = 0
    cand = embedder.candidate_threshold(threshold)
    for rows, cols, _ in range_pairs(index, q_views, cand):
        keep = rows < cols  # each unordered pair once; a row never pairs with itself
        rows, cols = rows[keep], cols[keep]
        if not len(rows):
            continue
        sims = embedder.similarity(queries[rows], vectors[cols], floor=threshold)
        for a, b, s in zip(rows[sims >= threshold], cols[sims >= threshold], sims[sims >= threshold]):
            uf.union(int(a), int(b))
            best[a], best[b] = max(best[a], s), max(best[b], s)
            joined += 1
    return joined


def keeper_of(rows: Sequence[int], risk, names) -> int:
    """The row among `rows` that a cluster keeps: the lowest risk, ties by id (names[row]); a
    missing or NaN risk ranks after every number. Clusters and reject_changed's new keepers
    choose by this one rule."""
    def rank(r: int) -> tuple:
        value = risk[r]
        known = value is not None and value == value
        return (not known, float(value) if known else 0.0, names[r])
    return min(rows, key=rank)


def _label(uf: UnionFind, risk: np.ndarray, ids: Sequence[str], best: np.ndarray, pairs: int) -> Clusters:
    """Number the clusters (sets of more than one row) in the order of their keepers' ids."""
    n = len(best)
    roots = uf.roots()
    cluster = np.full(n, -1, dtype=np.int64)
    keeper = np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(np.bincount(roots, minlength=n)[roots] > 1)
    names = _strings(ids, rows)
    members: dict[int, list[int]] = {}
    for r in rows:
        members.setdefault(int(roots[r]), []).append(int(r))
    keepers = [keeper_of(m, risk, names) for m in members.values()]
    for number, (m, k) in enumerate(sorted(zip(members.values(), keepers), key=lambda g: names[g[1]])):
        cluster[m] = number
        keeper[m] = k
    return Clusters(cluster, keeper, best, pairs)


def _strings(values: Sequence[str], rows: np.ndarray) -> dict[int, str]:
    """row -> value of the given rows, from a list or an Arrow array."""
    taken = _take(values, rows)
    return dict(zip(rows.tolist(), taken.to_pylist() if isinstance(taken, (pa.Array, pa.ChunkedArray)) else taken))

