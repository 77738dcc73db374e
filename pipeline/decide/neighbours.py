"""Neighbour search: every pair of vectors at or above a similarity, from a FAISS index.

The search runs in query batches against one index, so no N x N matrix is ever built: FAISS's
range search on the CPU; GPU indexes have no range search, so there each batch runs a
k-nearest search whose k doubles for the queries whose k-th neighbour is still above the
threshold (up to GPU_MAX_K).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.decide.index import QUERY_BATCH, build_index, chunks, on_gpu, search_views

log = logging.getLogger(__name__)

KNN_START = 32  # first k of the k-nearest emulation of a range search
GPU_MAX_K = 2048  # the largest k FAISS's GPU k-selection supports


def range_pairs(index, queries: np.ndarray, threshold: float, batch: int = QUERY_BATCH,
                search: str = "auto", view: Callable[[np.ndarray], np.ndarray] | None = None,
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(query rows, index rows, similarities) of every pair with similarity >= threshold, the
    queries taken `batch` at a time (through `view` when given; they may be memory-mapped).
    search: 'range' (FAISS range search), 'knn' (k-nearest with growing k: the GPU path) or
    'auto' (knn for GPU indexes, range otherwise)."""
    if search not in ("auto", "range", "knn"):
        raise ValueError(f"search must be auto, range or knn, got {search!r}")
    use_knn = search == "knn" or (search == "auto" and on_gpu(index))
    for start, chunk in chunks(queries, view, batch):
        if use_knn:
            rows, ids, sims = _knn_range(index, chunk, float(threshold))
            yield rows + start, ids, sims
            continue
        lims, sims, ids = index.range_search(chunk, float(threshold))
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        yield rows, ids, sims


def _knn_range(index, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A range search from k-nearest searches: a query whose k-th neighbour is still at or
    above the threshold is searched again with twice the k, until k covers the index or
    reaches GPU_MAX_K (then the pairs beyond it are missed, and a warning says how many queries)."""
    out_rows, out_ids, out_sims = [], [], []
    todo = np.arange(len(queries))
    k = min(KNN_START, index.ntotal)
    while len(todo) and k > 0:
        sims, ids = index.search(queries[todo], k)
        saturated = (sims[:, -1] >= threshold) & (ids[:, -1] >= 0)
        done = ~saturated | (k >= index.ntotal) | (k >= GPU_MAX_K)
        hit = (sims >= threshold) & (ids >= 0) & done[:, None]
        r, c = np.nonzero(hit)
        out_rows.append(todo[r])
        out_ids.append(ids[r, c].astype(np.int64))
        out_sims.append(sims[r, c])
        if k >= GPU_MAX_K and (saturated & done).any() and k < index.ntotal:
            log.warning("%d queries have more than %d neighbours above %.3f; pairs beyond the first %d "
                        "are not searched (union-find still joins them through the others)",
                        int(saturated.sum()), k, threshold, k)
        todo = todo[~done]
        k = min(2 * k, index.ntotal, GPU_MAX_K)
    if not out_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_rows), np.concatenate(out_ids), np.concatenate(out_sims)


def near_matches(queries: np.ndarray, reference: np.ndarray, threshold: float, embedder,
                 device: str = "cpu", query_views: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, its most similar reference row at or above threshold (else -1)
    and that similarity: used to check a new drop against an earlier cleaned output.
    query_views: the queries' search views, when they were computed already."""
    match = np.full(len(queries), -1, dtype=np.int64)
    sim = np.zeros(len(queries), dtype=np.float32)
    if not len(reference) or not len(queries):
        return match, sim
    index = build_index(reference, device=device, view=embedder.search_view)
    if query_views is None:
        query_views = search_views(queries, embedder.search_view)
    for rows, cols, _ in range_pairs(index, query_views, embedder.candidate_threshold(threshold)):
        if not len(rows):
            continue
        s = np.asarray(embedder.similarity(queries[rows], reference[cols], floor=threshold))
        keep = s >= threshold
        r, c, v = np.asarray(rows)[keep], np.asarray(cols)[keep], s[keep]
        # each row's most similar pair in this batch (the first of equals, as the pairs came)
        order = np.lexsort((np.arange(len(v)), -v, r))
        r, c, v = r[order], c[order], v[order]
        first = np.r_[True, r[1:] != r[:-1]] if len(r) else np.zeros(0, bool)
        r, c, v = r[first], c[first], v[first]
        better = v > sim[r]
        match[r[better]], sim[r[better]] = c[better], v[better]
    return match, sim



def nearest_similarity(queries: np.ndarray, query_keys: Sequence[str | None] | None, index, vectors: np.ndarray,
                       keys: Sequence[str | None] | None, embedder, candidates: int = 16,
                       query_views: np.ndarray | None = None, pairs: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the row of `vectors` (indexed in `index` by their search views) most
    similar to it by the embedder's similarity, among the `candidates` nearest by search view
    whose key (a pixel hash) differs from the query's, and that similarity (-inf and -1 when
    there is none). Keys None: nothing is skipped. Used for the similarity chance reaches."""
    n = len(queries)
    best_row, best = np.full(n, -1, np.int64), np.full(n, -np.inf)
    if not n or index.ntotal == 0:
        return best_row, best
    views = query_views if query_views is not None else search_views(queries, embedder.search_view)
    q_rows, v_rows = [], []
    todo, k = np.arange(n), min(candidates + 32, index.ntotal)
    while len(todo):
        _, ids = index.search(np.ascontiguousarray(views[todo]), k)
        short = []
        skip = query_keys is not None and keys is not None
        found = _strings_at(keys, ids[ids >= 0]) if skip else {}
        for t, row in zip(todo.tolist(), ids):
            row = row[row >= 0]
            if skip and query_keys[t] is not None:
                row = row[[found[int(j)] != query_keys[t] for j in row]]
            if len(row) < candidates and k < index.ntotal:
                short.append(t)  # its nearest are copies of it: search further
                continue
            q_rows += [t] * min(len(row), candidates)
            v_rows += row[:candidates].tolist()
        todo, k = np.array(short, np.int64), min(2 * k, index.ntotal)
    q_rows, v_rows = np.array(q_rows, np.int64), np.array(v_rows, np.int64)
    if not len(q_rows):
        return best_row, best
    sim = np.concatenate([embedder.similarity(queries[q_rows[s:s + pairs]], vectors[v_rows[s:s + pairs]])
                          for s in range(0, len(q_rows), pairs)]).astype(np.float64)
    order = np.lexsort((-sim, q_rows))  # by query, most similar first (ties: search order, lexsort is stable)
    first = order[np.r_[True, q_rows[order][1:] != q_rows[order][:-1]]]
    best[q_rows[first]], best_row[q_rows[first]] = sim[first], v_rows[first]
    return best_row, best


def _strings_at(values: Sequence[str | None], rows: np.ndarray) -> dict[int, str | None]:
    """{row: values[row]} for the distinct rows, from a list or an Arrow array."""
    rows = np.unique(rows)
    if hasattr(values, "take"):
        import pyarrow as pa
        return dict(zip(rows.tolist(), values.take(pa.array(rows, pa.int64())).to_pylist()))
    return {int(r): values[int(r)] for r in rows}
