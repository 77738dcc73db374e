"""Duplicate clusters on a generated set with planted exact and near duplicates."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.io.data import ImageSpec, batched, discover
from pipeline.decide.dedup import IVF_NPROBE, IVF_TRAIN_PER_LIST, UnionFind, build_index, duplicate_columns, \
    find_clusters, near_matches, range_pairs, read_index, write_index
from pipeline.decide.embeddings import CosineSimilarity, PixelEmbedder
from tests.planted import planted_set


def embed_folder(root: Path, size=(64, 64), flip=False):
    ds = [d for b in batched(discover(root), ImageSpec(3, size), 64) for d in b]
    x = torch.stack([d.pixels for d in ds])
    emb = PixelEmbedder(image_side=min(size))
    flipped = emb(x, flip=True).numpy() if flip else None
    return ds, emb(x).numpy(), flipped, emb


def pair_scores(truth: dict, ids: list, cluster: np.ndarray) -> tuple[float, float]:
    """Pairwise precision and recall of predicted clusters against planted groups."""
    g = np.array([truth[i] for i in ids])
    true = (g[:, None] == g[None, :]) & (g[:, None] >= 0)
    pred = (cluster[:, None] == cluster[None, :]) & (cluster[:, None] >= 0)
    off = ~np.eye(len(ids), dtype=bool)
    tp = (true & pred & off).sum()
    return tp / max((pred & off).sum(), 1), tp / max((true & off).sum(), 1)


@pytest.mark.parametrize("size", [(64, 64), (32, 32), (16, 16)])
def test_planted_clusters_precision_and_recall(tmp_path, size):
    truth = planted_set(tmp_path / "set", n_unique=300, n_groups=25)
    ds, v, _, emb = embed_folder(tmp_path / "set", size)
    ids = [d.item.id for d in ds]
    risk = np.arange(len(ids), dtype=float)[::-1]  # later files are lower risk
    c = find_clusters(v, [d.pixel_sha256 for d in ds], risk, ids, emb.default_threshold, emb)
    precision, recall = pair_scores(truth, ids, c.cluster)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert c.count == 25
    for k in range(c.count):
        members = np.where(c.cluster == k)[0]
        assert c.keeper[members[0]] == members[np.argmin(risk[members])]  # lowest risk keeps


def test_keeper_ties_broken_by_id_and_exact_hashes_join():
    v = np.eye(4, dtype=np.float32)  # nothing similar by vector
    c = find_clusters(v, ["h", "x", "h", "h"], np.zeros(4), ["d", "c", "b", "a"], 0.95, CosineSimilarity())
    assert c.cluster.tolist()[1] == -1 and len(set(c.cluster[[0, 2, 3]])) == 1
    assert c.keeper[0] == 3  # id "a"


def test_duplicate_columns_name_keepers_by_row_with_and_without_rejected_rows():
    """Vectors cover the ok rows only; dup_of names the keeper's id from the full table's
    columns (Arrow), whether some rows were rejected (their columns are taken) or none."""
    import pyarrow as pa

    ids, hashes = pa.array(["d", "b", "c", "a"]), pa.array(["h", None, "x", "h"])
    for ok in (np.array([True, False, True, True]), np.ones(4, bool)):
        v = np.eye(4, dtype=np.float32)[: ok.sum()]
        cols = duplicate_columns(v, None, ids, hashes, np.zeros(4), ok, 0.95, CosineSimilarity(), None)
        assert cols["dup_of"] == ["a", None, None, None]  # "a" (row 3) keeps: equal risk, lowest id
        assert cols["dup_cluster"][0] == cols["dup_cluster"][3] == 0 and cols["dup_cluster"][2] is None
        assert cols["dup_similarity"][0] == cols["dup_similarity"][3] == 1.0


def test_equal_groups_split_key_collisions_and_skip_nulls():
    """Rows are grouped by a key of each value's first 16 bytes; values that share those bytes
    (a forced collision) are told apart by the values themselves, across Arrow chunks and
    slices, and short values fall back to exact codes; nulls never match."""
    import pyarrow as pa

    from pipeline.decide.dedup import _equal_groups

    def groups(values):
        return sorted((first, rest.tolist()) for first, rest in _equal_groups(values))

    long = ["p" * 16 + "x", "p" * 16 + "y", "p" * 16 + "x", None, "q" * 64, "q" * 64, "p" * 16 + "y" * 9]
    want = [(0, [2]), (4, [5])]
    assert groups(long) == want
    assert groups(pa.chunked_array([pa.array(long[:3]), pa.array(long[3:])])) == want
    assert groups(pa.array(["zz"] + long).slice(1)) == want
    assert groups(["a", None, "a", "bb", None, "p" * 16 + "x", "bb"]) == [(0, [2]), (3, [6])]
    assert groups([]) == [] and groups([None, None]) == []


def test_flip_only_behind_the_option(tmp_path):
    truth = planted_set(tmp_path / "set", n_unique=40, n_groups=5, kinds=("flip",))
    ds, v, flipped, emb = embed_folder(tmp_path / "set", flip=True)
    ids = [d.item.id for d in ds]
    hashes = [None] * len(ids)  # vectors only
    without = find_clusters(v, hashes, np.zeros(len(ids)), ids, 0.95, emb)
    with_flip = find_clusters(v, hashes, np.zeros(len(ids)), ids, 0.95, emb, flipped=flipped)
    flip_ids = [i for i in ids if i.endswith("_flip.png")]

    def joined(c):
        return sum(c.cluster[ids.index(i)] >= 0 and c.cluster[ids.index(i)] == c.cluster[ids.index(i.replace("flip", "orig"))]
                   for i in flip_ids)

    assert joined(without) == 0 and joined(with_flip) == 5
    assert pair_scores(truth, ids, with_flip.cluster) == (1.0, 1.0)


def test_ivf_index_finds_the_same_pairs_as_flat():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noisy = base[:100] + 0.05 * rng.normal(size=(100, 32)).astype(np.float32)
    v = np.concatenate([base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    found = {}
    for kind in ("flat", "ivf"):
        idx = build_index(v, kind)
        found[kind] = {(int(a), int(b)) for r, c, _ in range_pairs(idx, v, 0.9, batch=500)
                       for a, b in zip(r, c) if a < b}
    assert len(found["flat"]) == 100
    assert len(found["ivf"] & found["flat"]) >= 95


@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_index_file_is_faiss_own_serialisation(tmp_path, n):
    """write_index streams the rows into the file a chunk at a time (memory-mapped rows in,
    never the index in memory); its bytes are faiss.write_index's for the same index built in
    memory, flat and IVF (with every IVF list non-empty, as asserted, FAISS writes the same
    'full' sizes), and read_index maps it back: the flat index searches as the in-memory one,
    the IVF lists are FAISS's on-disk lists."""
    import faiss

    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert write_index(mapped, tmp_path / "flat.faiss", "flat") == "flat"
    flat = faiss.IndexFlatIP(24)
    flat.add(x)
    assert (tmp_path / "flat.faiss").read_bytes() == faiss.serialize_index(flat).tobytes()
    mapped_flat = read_index(tmp_path / "flat.faiss")
    assert mapped_flat.ntotal == n
    if n:
        for got, want in zip(mapped_flat.search(x[:5], min(n, 3)), flat.search(x[:5], min(n, 3))):
            assert np.array_equal(got, want)
    if n < 1000:
        return
    assert write_index(mapped, tmp_path / "ivf.faiss", "ivf") == "ivf"
    nlist = int(4 * np.sqrt(n))  # as write_index sizes it; FAISS warns about the small training set
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(24), 24, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))
    ivf.train(x[sample])
    ivf.nprobe = IVF_NPROBE
    ivf.add(x)
    assert min(ivf.invlists.list_size(i) for i in range(nlist)) > 0
    assert (tmp_path / "ivf.faiss").read_bytes() == faiss.serialize_index(ivf).tobytes()
    mapped_ivf = read_index(tmp_path / "ivf.faiss")
    assert isinstance(faiss.downcast_InvertedLists(mapped_ivf.invlists), faiss.OnDiskInvertedLists)
    assert mapped_ivf.nprobe == IVF_NPROBE
    for got, want in zip(mapped_ivf.search(x[:50], 5), ivf.search(x[:50], 5)):
        assert np.array_equal(got, want)  # the same bytes searched by the same code
    with pytest.raises(ValueError, match="index kind"):
        write_index(x, tmp_path / "bad.faiss", "hnsw")


def test_knn_emulation_of_range_search_finds_the_same_pairs(caplog, monkeypatch):
    """The GPU path (k-nearest search, k doubling while the k-th neighbour is still above the
    threshold) returns exactly the range search's pairs, also for a cluster far larger than
    the first k, for flat and IVF indexes; a CUDA device without GPU FAISS falls back to the
    CPU with a warning."""
    import pipeline.decide.dedup as dedup

    rng = np.random.default_rng(1)
    base = rng.normal(size=(2000, 16)).astype(np.float32)
    big = base[0] + 0.02 * rng.normal(size=(150, 16)).astype(np.float32)  # one cluster of 151 > KNN_START
    pairs = base[1:41] + 0.05 * rng.normal(size=(40, 16)).astype(np.float32)
    v = np.concatenate([base, big, pairs])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for kind in ("flat", "ivf"):
        idx = build_index(v, kind)
        got = {}
        for search in ("range", "knn"):
            got[search] = {(int(a), int(b)): float(s) for r, c, sims in range_pairs(idx, v, 0.95, 700, search)
                           for a, b, s in zip(r, c, sims)}
        assert len(got["range"]) > 151 * 151 and set(got["knn"]) == set(got["range"])
        assert all(abs(got["knn"][p] - got["range"][p]) < 1e-5 for p in got["range"])
    monkeypatch.setattr(dedup, "GPU_MAX_K", 64)  # the GPU's k limit: pairs beyond it are reported missing
    with caplog.at_level("WARNING"):
        capped = {(int(a), int(b)) for r, c, _ in range_pairs(build_index(v, "flat"), v, 0.95, 700, "knn")
                  for a, b in zip(r, c)}
    assert len(capped) < len(got["range"]) and "not searched" in caplog.text
    with caplog.at_level("WARNING"):
        idx = build_index(v, "flat", device="cuda")
    if dedup.gpu_faiss_available():  # a GPU build of FAISS on a CUDA machine: the index moves there
        assert dedup.on_gpu(idx)
    else:
        assert not dedup.on_gpu(idx) and "no GPU support" in caplog.text
    with pytest.raises(ValueError, match="search must be"):
        next(range_pairs(idx, v, 0.9, search="nearest"))


def test_union_find():
    uf = UnionFind(5)
    uf.union(0, 1)
    uf.union(3, 4)
    uf.union(1, 4)
    assert len({uf.find(i) for i in (0, 1, 3, 4)}) == 1 and uf.find(2) == 2


def test_near_matches_against_an_earlier_output(tmp_path):
    planted_set(tmp_path / "set", n_unique=30, n_groups=4)
    ds, v, _, emb = embed_folder(tmp_path / "set")
    ids = [d.item.id for d in ds]
    previous = np.array([i.endswith("_orig.png") for i in ids])
    match, sim = near_matches(v[~previous], v[previous], 0.95, emb)
    new_ids = [i for i, p in zip(ids, previous) if not p]
    for i, m in zip(new_ids, match):
        assert (m >= 0) == i.startswith("g"), i


def test_memory_mapped_views_and_arrow_columns_give_the_same_clusters(tmp_path):
    """A run's vectors are memory-mapped and its ids and hashes are Arrow columns: the search
    views then go to an unnamed file beside the vectors, and the clusters are those of
    in-memory arrays and Python lists, exactly."""
    import pyarrow as pa

    from pipeline.decide.dedup import search_views

    planted_set(tmp_path / "set", n_unique=60, n_groups=6)
    ds, v, _, emb = embed_folder(tmp_path / "set")
    ids, hashes = [d.item.id for d in ds], [d.pixel_sha256 for d in ds]
    np.save(tmp_path / "v.npy", v)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    views = search_views(mapped, emb.search_view)
    assert isinstance(views, np.memmap) and np.array_equal(views, emb.search_view(v))
    assert {p.name for p in tmp_path.iterdir()} == {"set", "v.npy"}  # the views' file has no name
    risk = np.arange(len(ids), dtype=float)
    a = find_clusters(v, hashes, risk, ids, 0.95, emb)
    b = find_clusters(mapped, pa.chunked_array([hashes[:20], hashes[20:]]), risk, pa.array(ids), 0.95, emb, views=views)
    assert a.count == b.count >= 6 and np.array_equal(a.cluster, b.cluster) and np.array_equal(a.keeper, b.keeper)
    assert np.array_equal(a.best_similarity, b.best_similarity) and a.pairs == b.pairs


def test_a_faiss_without_memory_mapped_flat_indexes_is_refused_clearly(tmp_path, monkeypatch):
    """FAISS before 1.11 has no IO_FLAG_MMAP_IFC: read_index says which version it needs."""
    import faiss

    write_index(np.eye(3, dtype=np.float32), tmp_path / "i.faiss", "flat")
    monkeypatch.delattr(faiss, "IO_FLAG_MMAP_IFC")
    with pytest.raises(RuntimeError, match="FAISS 1.11 or later"):
        read_index(tmp_path / "i.faiss")
