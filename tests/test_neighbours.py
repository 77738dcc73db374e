"""Neighbour search: range search, its k-nearest emulation (the GPU path), flat and IVF, and
matches against an earlier output."""
import numpy as np
import pytest

from pipeline.decide.index import build_index
from pipeline.decide.neighbours import near_matches, range_pairs
from tests.planted import embed_folder, planted_set


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


def test_knn_emulation_of_range_search_finds_the_same_pairs(caplog, monkeypatch):
    """The GPU path (k-nearest search, k doubling while the k-th neighbour is still above the
    threshold) returns exactly the range search's pairs, also for a cluster far larger than
    the first k, for flat and IVF indexes; a CUDA device without GPU FAISS falls back to the
    CPU with a warning."""
    import pipeline.decide.index as index
    import pipeline.decide.neighbours as neighbours

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
    monkeypatch.setattr(neighbours, "GPU_MAX_K", 64)  # the GPU's k limit: pairs beyond it are reported missing
    with caplog.at_level("WARNING"):
        capped = {(int(a), int(b)) for r, c, _ in range_pairs(build_index(v, "flat"), v, 0.95, 700, "knn")
                  for a, b in zip(r, c)}
    assert len(capped) < len(got["range"]) and "not searched" in caplog.text
    with caplog.at_level("WARNING"):
        idx = build_index(v, "flat", device="cuda")
    if index.gpu_faiss_available():  # a GPU build of FAISS on a CUDA machine: the index moves there
        assert index.on_gpu(idx)
    else:
        assert not index.on_gpu(idx) and "no GPU support" in caplog.text
    with pytest.raises(ValueError, match="search must be"):
        next(range_pairs(idx, v, 0.9, search="nearest"))


def test_near_matches_against_an_earlier_output(tmp_path):
    planted_set(tmp_path / "set", n_unique=30, n_groups=4)
    ds, v, _, emb = embed_folder(tmp_path / "set")
    ids = [d.item.id for d in ds]
    previous = np.array([i.endswith("_orig.png") for i in ids])
    match, sim = near_matches(v[~previous], v[previous], 0.95, emb)
    new_ids = [i for i, p in zip(ids, previous) if not p]
    for i, m in zip(new_ids, match):
        assert (m >= 0) == i.startswith("g"), i
    # each match is the most similar reference row of all (every pair scored by the embedder)
    q, ref = v[~previous], v[previous]
    for r in range(len(q)):
        s = np.asarray(emb.similarity(np.repeat(q[r:r + 1], len(ref), 0), ref, floor=0.95))
        best = int(np.argmax(s))
        if s[best] >= 0.95:
            assert match[r] >= 0 and s[match[r]] == s[best] and sim[r] == np.float32(s[best]), r
        else:
            assert match[r] == -1 and sim[r] == 0, r
