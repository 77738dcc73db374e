"""Duplicate clusters: FAISS range search over unit vectors (cosine similarity), union-find.

Exact duplicates (equal decoded-pixel hashes) are joined first; near duplicates are pairs whose
cosine similarity is at least the threshold. The search runs in query batches against one
index (exact IndexFlatIP up to FLAT_MAX vectors, IVF above), so no N x N matrix is ever built.
The index is written to its file a chunk at a time, in FAISS's own format, and searched
memory-mapped from it: its storage (1 KB an image) is file pages, not memory the run holds.
With a CUDA device and a GPU build of FAISS (faiss-gpu) the index moves to the GPU; GPU
indexes have no range search, so there each batch runs a k-nearest search whose k doubles
for the queries whose k-th neighbour is still above the threshold (up to GPU_MAX_K).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.fields import setting

log = logging.getLogger(__name__)

# Above FLAT_MAX vectors, an IVF index. benchmarks/dedup.py (2 CPU cores, d = 1024): the exact
# flat self-search takes 0.56 s at 5,000, 6.9 s at 20,000 and 35 s at 50,000 vectors (0.7 ms per
# image, growing linearly: about 1.4 ms at 100,000, well under 1% of the ~0.5 s per image that
# scoring costs), while IVF is no faster below 20,000 and 1.14x faster at 50,000 (recall 1.000
# on that data). Exactness is worth its price up to here; past it IVF's sqrt(n) advantage grows.
FLAT_MAX = 100_000
QUERY_BATCH = 4096  # queries per range search call
VIEW_BATCH = 1024  # rows per search-view computation (a view's scratch is a few times its rows)
IVF_TRAIN_PER_LIST = 39  # training points per IVF list
IVF_NPROBE = 8  # IVF lists searched per query
KNN_START = 32  # first k of the k-nearest emulation of a range search
GPU_MAX_K = 2048  # the largest k FAISS's GPU k-selection supports
THRESHOLD_MEANING = ("cosine similarity of the embeddings (pixel: min(correlation, 1 - (1 - detail correlation) / 2) "
                     "of 32x32 blurred grey thumbnails, aligned over zooms of +-5% and shifts of up to 1/32 of the "
                     "image or one image pixel, whichever is larger); pairs at or above it are duplicates")


@dataclass(frozen=True)
class DedupSettings:
    """How duplicates are found."""

    embedder: str = setting("pixel", "pixel (model-free, default), unet (the model's own features) or "
                            "torchscript:PATH (a local TorchScript model, e.g. SSCD)")
    embed_size: int = setting(224, "torchscript embedders: input side")
    dup_threshold: float | None = setting(None, "cosine similarity at or above which two images are duplicates "
                                          "(pixel: the aligned correlation of 32x32 blurred grey thumbnails and of "
                                          "their detail, default 0.95; unet 0.95; torchscript 0.75)")
    dedup_flip: bool = setting(False, "also match horizontally mirrored copies")
    against: str | None = setting(None, "an earlier memclean output: new images that duplicate its kept images "
                                  "are dropped")

    def __post_init__(self) -> None:
        if self.dup_threshold is not None and not -1 <= self.dup_threshold <= 1:
            raise ValueError(f"--dup-threshold is a cosine similarity in [-1, 1], got {self.dup_threshold}")
        if self.embed_size < 1:
            raise ValueError(f"--embed-size must be positive, got {self.embed_size}")


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


def mark_earlier_duplicates(cols: dict[str, list], ok: np.ndarray, vectors: np.ndarray, label: str,
                            earlier_ids: list[str], earlier: np.ndarray, threshold: float, embedder,
                            device: str = "cpu", views: np.ndarray | None = None) -> None:
    """Point dup_of of each ok row that duplicates an earlier output's kept image (and no image
    of its own cluster) at it, as `label:id`. views: the vectors' search views, when computed."""
    rows = np.where(ok)[0]
    match, sim = near_matches(vectors, earlier, threshold, embedder, device, views)
    for k, r in enumerate(rows):
        if match[k] >= 0 and cols["dup_of"][r] is None:
            cols["dup_of"][r] = f"{label}:{earlier_ids[match[k]]}"
            cols["dup_similarity"][r] = float(sim[k])


def gpu_faiss_available() -> bool:
    import faiss

    return hasattr(faiss, "index_cpu_to_gpu") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def on_gpu(index) -> bool:
    return type(index).__name__.startswith("Gpu")


def _chunks(vectors: np.ndarray, view: Callable[[np.ndarray], np.ndarray] | None,
            size: int = QUERY_BATCH) -> Iterator[tuple[int, np.ndarray]]:
    """(start, view of rows start..start+size) over vectors that may be memory-mapped: only one
    chunk of the view is ever in memory."""
    for start in range(0, len(vectors), size):
        chunk = np.asarray(vectors[start:start + size])
        yield start, np.ascontiguousarray(view(chunk) if view else chunk, dtype=np.float32)


def search_views(vectors: np.ndarray, view: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """Every row through `view` (an embedder's search view), a chunk at a time. When vectors
    are memory-mapped from a file, the views go to an unnamed temporary file beside it, mapped
    too: their pages are the kernel's to drop, and the file is gone once the array is."""
    if view is None:
        return vectors if vectors.dtype == np.float32 and vectors.flags.c_contiguous \
            else np.ascontiguousarray(vectors, dtype=np.float32)
    folder = os.path.dirname(getattr(vectors, "filename", None) or "")
    n = len(vectors)
    d = view(np.ones((1, vectors.shape[1]), np.float32)).shape[1]
    out = np.memmap(tempfile.TemporaryFile(dir=folder), np.float32, "w+", shape=(n, d)) if folder and n \
        else np.empty((n, d), np.float32)
    for start, chunk in _chunks(vectors, view, VIEW_BATCH):
        out[start:start + len(chunk)] = chunk
    return out


def build_index(vectors: np.ndarray, kind: str = "auto", device: str = "cpu",
                view: Callable[[np.ndarray], np.ndarray] | None = None, path: str | os.PathLike | None = None):
    """An inner-product FAISS index over unit vectors [N, d] (flat, or IVF for large N) or
    their `view` (an embedder's search view; see search_views), written to `path` (an
    unnamed temporary file when None) by write_index and read back memory-mapped: FAISS's
    storage is the file's pages, which the kernel can drop, not memory the run holds. On the
    GPU when `device` is CUDA and FAISS has GPU support (else on the CPU, with a warning)."""
    import faiss

    x = search_views(vectors, view)
    if path is None:  # a file that is gone once read: the map keeps its pages
        folder = os.path.dirname(getattr(x, "filename", None) or getattr(vectors, "filename", None) or "") or None
        fd, tmp = tempfile.mkstemp(suffix=".faiss", dir=folder)
        os.close(fd)
        try:
            write_index(x, tmp, kind)
            index = read_index(tmp)
        finally:
            os.unlink(tmp)
    else:
        write_index(x, path, kind)
        index = read_index(path)
    del x
    if str(device).startswith("cuda"):
        if gpu_faiss_available():
            gpu = int(str(device).partition(":")[2] or 0)
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, gpu, index)
            index.memclean_resources = resources  # the GPU memory must live as long as the index
        else:
            log.warning("device %s: this FAISS build has no GPU support (install faiss-gpu); "
                        "duplicate search runs on the CPU", device)
    return index


def check_faiss() -> None:
    """FAISS must memory-map flat indexes (IO_FLAG_MMAP_IFC, FAISS 1.11): checked when a run
    starts, not hours later at its duplicate search."""
    import faiss

    if not hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        raise RuntimeError(f"FAISS {faiss.__version__} cannot memory-map a flat index: memclean needs FAISS 1.11 "
                           "or later (pip install 'faiss-cpu>=1.11', or faiss-gpu of that version)")


def read_index(path: str | os.PathLike):
    """A FAISS index file memory-mapped: a flat index's storage (IO_FLAG_MMAP_IFC), or an IVF
    index's lists (IO_FLAG_MMAP: OnDiskInvertedLists over the file). FAISS takes one or the other."""
    import faiss

    check_faiss()
    with open(path, "rb") as f:
        ivf = f.read(4) == b"IwFl"
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC)


def write_index(x: np.ndarray, path: str | os.PathLike, kind: str = "auto") -> str:
    """Write `x` [N, d] (float32, possibly memory-mapped) as a FAISS inner-product index file
    a chunk at a time: IndexFlatIP up to FLAT_MAX rows (or kind 'flat'), else IndexIVFFlat.
    FAISS's own serialisation gives the header and the rows follow in its layout, without ever
    holding the index (at a million images it is 1 GB): faiss.read_index reads it as the same
    index built in memory, and the bytes are faiss.write_index's own (for IVF when more than
    half the lists are non-empty; FAISS writes sparse list sizes otherwise). Returns the kind."""
    if kind not in ("auto", "flat", "ivf"):
        raise ValueError(f"index kind must be auto, flat or ivf, got {kind!r}")
    n, d = x.shape
    flat = kind == "flat" or (kind == "auto" and n <= FLAT_MAX)
    with open(path, "wb") as f:
        if flat:
            _write_flat(f, x)
        else:
            _write_ivf(f, x)
    return "flat" if flat else "ivf"


def _serialized(index) -> bytearray:
    import faiss

    return bytearray(faiss.serialize_index(index).tobytes())


def _set_ntotal(header: bytearray, n: int) -> bytearray:
    """Every FAISS index header is fourcc, d (int32), ntotal (int64), ...: set ntotal."""
    if header[8:16] != bytes(8):
        raise RuntimeError("unexpected FAISS index header (ntotal of an empty index is not 0)")
    header[8:16] = np.int64(n).tobytes()
    return header


def _write_flat(f, x: np.ndarray) -> None:
    """IndexFlatIP: its header, then its codes as one vector (count of floats, the floats)."""
    import faiss

    n, d = x.shape
    header = _serialized(faiss.IndexFlatIP(d))  # ends with the empty codes vector's count, 0
    if header[-8:] != bytes(8) or header[:4] != b"IxFI":
        raise RuntimeError("unexpected FAISS IndexFlatIP serialisation")
    header[-8:] = np.uint64(n * d).tobytes()
    f.write(_set_ntotal(header, n))
    for start, chunk in _chunks(x, None):
        f.write(chunk.tobytes())


IVF_EMPTY_LISTS = 32  # "ilar", nlist, code_size, "sprs", an empty vector: the lists of an empty index


def _write_ivf(f, x: np.ndarray) -> None:
    """IndexIVFFlat: FAISS's serialisation of the trained, empty index up to its inverted
    lists, then the lists in FAISS's array layout ("ilar", "full" sizes, then each non-empty
    list's codes and ids), each row in the list of its nearest centroid (quantizer.assign, as
    IndexIVF.add does), in row order within a list."""
    import faiss

    n, d = x.shape
    # benchmarks/dedup_million.py: 4 sqrt(n) lists trained on 39 points each (FAISS's floor)
    # and 8 probed keep the planted pairs' recall above 0.95 at a million, in minutes on 2 cores
    nlist = max(1, int(4 * np.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))
    index.train(np.ascontiguousarray(x[sample]))
    index.nprobe = min(nlist, IVF_NPROBE)
    empty = _serialized(index)
    tail = empty[-IVF_EMPTY_LISTS:]
    if tail[:4] != b"ilar" or tail[20:24] != b"sprs" or empty[:4] != b"IwFl":
        raise RuntimeError("unexpected FAISS IndexIVFFlat serialisation")
    lists = np.empty(n, np.int64)
    for start, chunk in _chunks(x, None):
        lists[start:start + len(chunk)] = index.quantizer.assign(chunk, 1).ravel()
    order = np.argsort(lists, kind="stable")
    sizes = np.bincount(lists, minlength=nlist).astype(np.uint64)
    del lists
    f.write(_set_ntotal(empty[:-IVF_EMPTY_LISTS], n))
    f.write(b"ilar" + np.uint64(nlist).tobytes() + np.uint64(d * 4).tobytes() + b"full")
    f.write(np.uint64(nlist).tobytes() + sizes.tobytes())
    ends = np.cumsum(sizes.astype(np.int64))
    for end, size in zip(ends.tolist(), sizes.tolist()):
        if size:
            rows = order[end - size:end]
            f.write(np.ascontiguousarray(x[rows], dtype=np.float32).tobytes())
            f.write(rows.astype(np.int64).tobytes())


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
    for start, chunk in _chunks(queries, view, batch):
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
        s = embedder.similarity(queries[rows], reference[cols], floor=threshold)
        for r, c, v in zip(rows, cols, s):
            if v >= threshold and v > sim[r]:
                match[r], sim[r] = c, v
    return match, sim


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
    keepers = [min(m, key=lambda i: (risk[i], names[i])) for m in members.values()]
    for number, (m, k) in enumerate(sorted(zip(members.values(), keepers), key=lambda g: names[g[1]])):
        cluster[m] = number
        keeper[m] = k
    return Clusters(cluster, keeper, best, pairs)


def _strings(values: Sequence[str], rows: np.ndarray) -> dict[int, str]:
    """row -> value of the given rows, from a list or an Arrow array."""
    taken = _take(values, rows)
    return dict(zip(rows.tolist(), taken.to_pylist() if isinstance(taken, (pa.Array, pa.ChunkedArray)) else taken))
