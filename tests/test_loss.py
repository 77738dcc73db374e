"""The denoising loss against exact answers: a zero network, Gaussian data, and the batch.

Tolerances: a mean of n independent per-noise losses lies within 5 of its standard deviations
/ sqrt(n) of its expectation (probability 1 - 6e-7); float64 sums of D terms err by D 2^-52.
"""
import math

import pytest
import torch

from pipeline.score.loss import denoising_loss
from pipeline.score.schedules import LinearVP, VESchedule
from tests.exact import GaussianScore, ZeroScore

SCHEDULES = {"linear": lambda: LinearVP(1000, 1e-4, 0.02), "ve": lambda: VESchedule(0.01, 50.0)}


def test_a_zero_network_has_the_noise_energy_as_its_loss():
    """eps_hat = 0: each noise's loss is |eps|^2 / D, a chi-square over D: mean 1, variance 2 / D;
    the reported standard error estimates sqrt(2 / D / n) (a sample sd over n = 256 noises is
    within 5 sqrt(1 / (2 n)) of the truth, relatively)."""
    score = ZeroScore(SCHEDULES["linear"]())
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    n, D = 256, 64
    r = denoising_loss(score, x, 0.3, n)
    assert torch.all((r.denoising_loss - 1).abs() < 5 * math.sqrt(2 / D / n))
    expected_se = math.sqrt(2 / D / n)
    assert torch.all((r.denoising_loss_se / expected_se - 1).abs() < 5 / math.sqrt(2 * n))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_gaussian_data_gives_the_closed_form_loss(name):
    """Data N(0, s^2 I): the exact noise prediction at x_t = alpha x + sigma eps is
    eps_hat = sigma x_t / v, v = alpha^2 s^2 + sigma^2, so a noise's loss is |a + b eps|^2 / D with
    a = sigma alpha x / v, b = sigma^2 / v - 1: mean |a|^2 / D + b^2, variance
    (4 b^2 |a|^2 / D + 2 b^4 D) / D^2 over the noise."""
    schedule = SCHEDULES[name]()
    s = 0.5
    score = GaussianScore(torch.zeros(1, 4, 4), torch.full((1, 4, 4), s), schedule)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64) * s
    t, n, D = 0.2, 512, 16
    tt = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = float(torch.exp(schedule.log_alpha(tt))), float(schedule.sigma(tt))
    v = alpha**2 * s**2 + sigma**2
    a2 = ((sigma * alpha / v) ** 2 * (x**2).flatten(1).sum(1))
    b = sigma**2 / v - 1
    mean = a2 / D + b**2
    sd = torch.sqrt((4 * b**2 * a2 / D + 2 * b**4 * D) / D**2)
    r = denoising_loss(score, x, t, n)
    assert torch.all((r.denoising_loss - mean).abs() < 5 * sd / math.sqrt(n)), (r.denoising_loss, mean)


def test_an_images_loss_depends_on_neither_its_batch_nor_its_order():
    """The noises are a hash of (seed, the image): alone, in a batch, reversed, the same
    numbers (an exact score: float64 rounding only); another seed, other noises."""
    score = GaussianScore(torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.5), SCHEDULES["linear"]())
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    whole = denoising_loss(score, x, 0.1, 16).denoising_loss
    alone = torch.cat([denoising_loss(score, x[i:i + 1], 0.1, 16).denoising_loss for i in range(4)])
    backwards = denoising_loss(score, x.flip(0), 0.1, 16).denoising_loss.flip(0)
    bound = 64 * 16 * 2.0**-52 * float(whole.abs().max())
    assert torch.allclose(whole, alone, rtol=0, atol=bound) and torch.allclose(whole, backwards, rtol=0, atol=bound)
    assert not torch.allclose(whole, denoising_loss(score, x, 0.1, 16, seed=1).denoising_loss)
