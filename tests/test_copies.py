"""decide/copies.py: the ratio test's search against brute force, and the rules it applies."""
import math

import numpy as np
import pytest

from pipeline.decide import copies
from pipeline.decide.copies import CopySettings, nearest_distinct, picture_groups, ratio_test, wilson_interval


def brute(queries, train, groups):
    """Nearest and nearest-other-picture distances by numpy in float64 (the truth)."""
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - train[None].astype(np.float64)) ** 2).sum(-1))
    near = d.argmin(1)
    other = np.where(groups[None, :] != groups[near][:, None], d, np.inf).min(1)
    return d.min(1), other, near


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_nearest_distinct_is_brute_force_in_any_chunking(monkeypatch, chunk_rows):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 48)).astype(np.float32)
    groups = rng.integers(0, 25, 60)  # pictures of up to several rows
    queries = np.concatenate([train[:10] + 0.01 * rng.normal(size=(10, 48)), rng.normal(size=(30, 48))]).astype(np.float32)
    monkeypatch.setattr(copies, "CHUNK_BYTES", chunk_rows * 4 * 48)
    d1, d2, near = nearest_distinct(queries, train, groups)
    t1, t2, tnear = brute(queries, train, groups)
    # FAISS's float32 squared distances ||q||^2 + ||x||^2 - 2 q.x err by about 4 eps32 (||q||^2 +
    # ||x||^2) (~ 100 here), so d^2 within 1e-3 absolute; distances here are >= 0.05 apart
    assert np.allclose(d1**2, t1**2, atol=1e-3) and np.allclose(d2**2, t2**2, atol=1e-3)
    assert (near == tnear).all()


def test_copies_of_one_picture_count_once():
    """A generation at an image that has an exact copy: the copy beside it does not excuse it
    (grouped by picture), as it would if the two were separate pictures (ratio 1)."""
    a, b = np.zeros(16, np.float32), np.full(16, 10, np.float32)
    train = np.stack([a, a, b])
    g = (a + 0.1)[None]
    hashes = ["ha", "ha", "hb"]
    d1, d2, near = nearest_distinct(g, train, picture_groups(hashes))
    assert ratio_test(d1, d2, 1 / 3)[0] and d1[0] == pytest.approx(0.4) and d2[0] == pytest.approx(math.sqrt(16 * 9.9**2))
    s1, s2, _ = nearest_distinct(g, train, np.arange(3))  # each row its own picture
    assert not ratio_test(s1, s2, 1 / 3)[0]
    # searching one row per exact copy gives the same answer
    d1b, d2b, _ = nearest_distinct(g, train, picture_groups(hashes), distinct_rows=np.array([0, 2]))
    assert d1b[0] == pytest.approx(0.4) and d2b[0] == pytest.approx(d2[0])


def test_clusters_join_near_copies_into_one_picture():
    g = picture_groups(["a", "b", "c"], [None, 5, 5])  # b and c: near copies a clean run clustered
    assert g[1] == g[2] != g[0]
    g = picture_groups(["a", "a", "b"])
    assert g[0] == g[1] != g[2]


def test_ratio_test_boundaries():
    assert ratio_test(np.array([0.99]), np.array([3.0]), 1 / 3).tolist() == [True]
    assert ratio_test(np.array([1.0]), np.array([3.0]), 1 / 3).tolist() == [False]  # strictly closer
    assert ratio_test(np.array([5.0]), np.array([np.inf]), 1 / 3).tolist() == [True]  # a lone picture


def test_wilson_interval_closed_forms():
    z = 1.959964
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))  # k = 0: upper end z^2 / (n + z^2)
    lo, hi = wilson_interval(5, 10)
    assert lo + hi == pytest.approx(1.0) and hi - 0.5 == pytest.approx(z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_settings_checked():
    with pytest.raises(ValueError, match="copy-ratio"):
        CopySettings(copy_ratio=1.5)
