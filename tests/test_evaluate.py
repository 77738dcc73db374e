import numpy as np
import pytest

from pipeline.evaluate import memorized, nearest, roc_auc, separation, tpr_at_fpr


def test_auc_against_exact_counts():
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1], [1]) == 0.5
    assert roc_auc([2, 0], [1]) == 0.5  # one pair won, one lost
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 400), rng.normal(0, 1, 400)
    brute = np.mean(a[:, None] > b[None, :])
    assert roc_auc(a, b) == pytest.approx(brute)


def test_separation_and_tpr():
    pos, neg = np.arange(100, 200.0), np.arange(0, 100.0)
    s = separation(pos, neg)
    assert s["auc"] == 1.0 and s["welch_p"] < 1e-10 and s["tpr_at_1pct_fpr"] == 1.0
    assert tpr_at_fpr(np.array([0.0, 1000.0]), neg, 0.01) == 0.5


def test_nearest_and_memorized_ratio():
    train = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = np.array([[0.1, 0.0], [5.0, 5.0]])
    d1, d2, idx = nearest(samples, train)
    assert idx.tolist()[0] == 0 and d1[0] == pytest.approx(0.1) and d2[0] == pytest.approx(np.hypot(9.9, 0))
    m = memorized(samples, train)
    assert m["count"] == 1 and m["copied_train_rows"] == [0]
    d1, _, idx = nearest(train, train, exclude_self=True)
    assert d1.tolist() == [10.0, 10.0, 10.0] and idx[0] in (1, 2)


def test_memorized_counts_copies_of_a_duplicated_image():
    """A generation on top of a duplicated training image is memorized: its second-nearest
    *distinct* image is far, even though an identical copy sits at the same distance."""
    train = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = np.array([[0.1, 0.0], [5.0, 5.0], [9.9, 0.0]])
    m = memorized(samples, train)
    assert m["count"] == 2 and m["mask"].tolist() == [True, False, True]
    assert m["copied_train_rows"] == [0, 1, 2, 3] and m["copied_images"] == 2
    # explicit groups: near copies of one image count as one image
    near = train + np.array([[0, 0], [0.05, 0], [0, 0.05], [0, 0], [0, 0]])
    assert memorized(samples, near)["count"] == 1  # without groups the near copies excuse each other
    assert memorized(samples, near, groups=np.array([0, 0, 0, 1, 2]))["count"] == 2
