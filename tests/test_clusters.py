"""Duplicate clusters on a generated set with planted exact and near duplicates."""
import numpy as np
import pytest

from pipeline.decide.clusters import UnionFind, duplicate_columns, find_clusters, keeper_of
from pipeline.decide.embeddings import CosineSimilarity
from tests.planted import embed_folder, planted_set


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


def test_a_missing_risk_never_makes_a_keeper_while_a_member_has_one():
    """NaN or None ranks after every number whatever the rows' order (a NaN compared in a tuple
    is neither less nor greater, so min() would keep whichever row came first)."""
    names = ["a", "b", "c", "d"]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]):
        assert keeper_of(order, [float("nan"), 2.0, 1.0, None], names) == 2
        assert keeper_of(order, [float("nan"), None, float("nan"), None], names) == 0  # none known: by id
        assert keeper_of(order, np.array([np.nan, 5.0, 5.0, np.nan]), names) == 1  # a tie: by id
    v = np.eye(3, dtype=np.float32)
    c = find_clusters(v, ["h", "h", "h"], np.array([np.nan, 3.0, np.nan]), ["a", "b", "c"], 0.95, CosineSimilarity())
    assert c.keeper.tolist() == [1, 1, 1]


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

    from pipeline.decide.clusters import _equal_groups

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


def test_union_find():
    uf = UnionFind(5)
    uf.union(0, 1)
    uf.union(3, 4)
    uf.union(1, 4)
    assert len({uf.find(i) for i in (0, 1, 3, 4)}) == 1 and uf.find(2) == 2


def test_memory_mapped_views_and_arrow_columns_give_the_same_clusters(tmp_path):
    """A run's vectors are memory-mapped and its ids and hashes are Arrow columns: the search
    views then go to an unnamed file beside the vectors, and the clusters are those of
    in-memory arrays and Python lists, exactly."""
    import pyarrow as pa

    from pipeline.decide.index import search_views

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
