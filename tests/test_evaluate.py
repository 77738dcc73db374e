import numpy as np
import pytest

from pipeline.tools.evaluate import memorized, nearest, roc_auc, separation, tpr_at_fpr


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


def test_nearest_on_a_one_image_training_set():
    d1, d2, idx = nearest(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]))
    assert d1.tolist() == [1.0] and d2.tolist() == [np.inf] and idx.tolist() == [0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_loss_is_the_same_for_every_prediction_type(prediction_type):
    """An oracle network for Gaussian data, asked for eps, v or x_0, has one noise-prediction
    error: the baseline must give the same loss for all three (it once compared every output
    with eps). The loss is also independent of the image's place in the batch."""
    import torch
    from diffusers import DDPMScheduler

    from pipeline.tools.evaluate import denoising_loss
    from pipeline.score.schedules import LinearVP
    from tests.exact import GaussianScore
    from tests.test_models import GaussianNet

    schedule = LinearVP(1000, 1e-4, 0.02)
    gauss = GaussianScore(torch.zeros(1, 2, 2) + 0.3, torch.full((1, 2, 2), 0.5), schedule)
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)

    class Oracle(GaussianNet):
        def forward(self, x_k, k):  # the discrete step k: abar_k from the scheduler itself
            abar = scheduler.alphas_cumprod[int(k[0])].double()
            eps = -(1 - abar).sqrt() * ((x_k.double() - abar.sqrt() * self.gauss.mu) / (abar * self.gauss.s**2 + 1 - abar))
            x0 = (x_k.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
            out = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "sample": x0}
            return type("Out", (), {"sample": out[self.prediction_type]})()

    net = Oracle(gauss, prediction_type).double()
    loss = denoising_loss(net, scheduler, x, timestep=300, repeats=4)
    reference = denoising_loss(Oracle(gauss, "epsilon").double(), DDPMScheduler(), x, timestep=300, repeats=4)
    # float64 conversions of O(1) values divided by sqrt(1 - abar) >= 0.5: 1e-12
    assert loss == pytest.approx(reference, rel=1e-9, abs=1e-12)
    flipped = denoising_loss(net, scheduler, x.flip(0), timestep=300, repeats=4)
    assert flipped[::-1] == pytest.approx(loss, rel=1e-12)
