"""The ODE engine against exact answers: Gaussian data, zero networks, exact divergence."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.models import DiffusersScore
from pipeline.schedules import LinearVP, ScaledLinearVP, VESchedule, schedule_from_scheduler
from pipeline.volume import (ScorerSettings, drift, drift_and_vjps, exact_divergence, hutchinson_divergence,
                             log_volume_growth, time_grid)
from tests.exact import GaussianScore, ZeroScore, tiny_unet

TIGHT = dict(rtol=1e-8, atol=1e-8)
EPS = 1e-5

SCHEDULES = {
    "linear": lambda: LinearVP(1000, 1e-4, 0.02),
    "scaled_linear": lambda: ScaledLinearVP(1000, 8.5e-4, 0.012),
    "cosine": lambda: schedule_from_scheduler(DDPMScheduler(beta_schedule="squaredcos_cap_v2")),
    "ve": lambda: VESchedule(0.01, 50.0),
}


def gaussian(schedule, shape=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g) * 0.5
    s = torch.rand(shape, generator=g) * 0.6 + 0.05
    x = mu + s * torch.randn((3, *shape), generator=g)
    return GaussianScore(mu, s, schedule), x


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("divergence", ["exact", "gaussian"])
def test_gaussian_data_matches_closed_form(name, divergence):
    score, x = gaussian(SCHEDULES[name]())
    r = log_volume_growth(score, x, ScorerSettings(divergence=divergence, probes=1, **TIGHT))
    expected_V = score.log_volume_growth(EPS)
    rel = 5e-5 if name == "cosine" else 1e-7  # see test_zero_network_volume
    if divergence == "exact":
        assert torch.allclose(r.log_volume_growth, torch.full((3,), expected_V, dtype=torch.float64), rtol=rel)
    assert torch.allclose(r.latent, score.latent(x, EPS), rtol=1e-5, atol=1e-5)
    # log p(x) = log p_1(x_1) + V with the true marginal p_1 in place of the prior
    true_p1 = score.logp(r.latent, 1.0)
    if divergence == "exact":
        assert torch.allclose(true_p1 + r.log_volume_growth, score.logp(x, EPS), rtol=1e-6, atol=1e-5)
    assert torch.allclose(r.logp, r.prior_logp + r.log_volume_growth)


def test_rademacher_is_exact_for_a_diagonal_jacobian():
    score, x = gaussian(SCHEDULES["linear"]())
    r = log_volume_growth(score, x, ScorerSettings(divergence="rademacher", **TIGHT))
    assert r.log_volume_growth == pytest.approx([score.log_volume_growth(EPS)] * 3, rel=1e-6)


@pytest.mark.parametrize("name,rel", [("linear", 1e-7), ("scaled_linear", 1e-7), ("cosine", 5e-5)])
def test_zero_network_volume(name, rel):
    """eps_hat = 0: f = -beta x / 2, so V = D/2 (log abar(1) - log abar(eps)).

    The interpolated (cosine) beta is only continuous at the knots and rises 4x within the
    last 1/N: dopri5 reaches about 1e-5 relative there, whatever the tolerance.
    """
    schedule = SCHEDULES[name]()
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    r = log_volume_growth(ZeroScore(schedule), x, ScorerSettings(divergence="exact", **TIGHT))
    la = lambda t: float(schedule.log_abar(torch.tensor(t, dtype=torch.float64)))
    assert r.log_volume_growth == pytest.approx([16 / 2 * (la(1.0) - la(EPS))] * 2, rel=rel)
    assert r.prior_logp == pytest.approx((-0.5 * (r.latent.flatten(1) ** 2).sum(1) - 8 * math.log(2 * math.pi)).tolist())


@pytest.mark.parametrize("grid,s", [("uniform", 0.3), ("log_snr", 0.3), ("log_snr", 1e-3)])
@pytest.mark.parametrize("solver,steps,order", [("euler", 200, 1), ("heun", 40, 2), ("rk4", 10, 4)])
def test_fixed_grid_solvers_converge_at_their_order(solver, steps, order, grid, s):
    """Doubling the steps divides the error in V by about 2^order, on both grids; the
    log-SNR grid keeps its order on sharply concentrated data (s = 0.001)."""
    score, x = gaussian(SCHEDULES["linear"]())
    score.s = score.s.clamp(min=s) if s > 0.1 else torch.full_like(score.s, s)
    exact = score.log_volume_growth(EPS)
    err = []
    for n in (steps, 2 * steps):
        r = log_volume_growth(score, x[:1], ScorerSettings(divergence="exact", solver=solver, steps=n, grid=grid))
        assert int(r.nfe) == n * {"euler": 1, "heun": 2, "rk4": 4}[solver]
        err.append(abs(float(r.log_volume_growth) - exact))
    assert 0.6 * 2**order < err[0] / err[1] < 1.6 * 2**order, err
    assert err[1] < 0.025 * exact


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "ve"])
def test_log_snr_grid_integrates_concentrated_data(name):
    """Data concentrated like 8-bit images under a memorizing model (N(mu, 0.001^2)): div f
    grows like 1/t near eps, so a grid uniform in t misses V by an order of magnitude with 50
    Heun steps, while the default log-SNR grid is within 4% (rk4: 0.1%)."""
    score, x = gaussian(SCHEDULES[name]())
    score.s = torch.full_like(score.s, 1e-3)
    exact = score.log_volume_growth(EPS)
    got = {}
    for grid, solver in (("uniform", "heun"), ("log_snr", "heun"), ("log_snr", "rk4")):
        r = log_volume_growth(score, x[:1], ScorerSettings(divergence="exact", solver=solver, steps=50, grid=grid))
        got[grid, solver] = float(r.log_volume_growth)
    assert abs(got["log_snr", "heun"] - exact) < 0.04 * abs(exact), (got, exact)
    assert abs(got["log_snr", "rk4"] - exact) < 1e-3 * abs(exact), (got, exact)
    if name != "ve":  # VE's log-SNR is linear in t: the two grids coincide
        assert abs(got["uniform", "heun"] - exact) > 0.5 * abs(exact), (got, exact)


def test_time_grid_is_uniform_in_log_snr():
    schedule = SCHEDULES["linear"]()
    t = time_grid(schedule, ScorerSettings(solver="heun", steps=20, eps=1e-5))
    assert t[0] == 1e-5 and t[-1] == 1.0 and bool((t.diff() > 0).all())
    assert torch.allclose(schedule.log_snr(t).diff(), schedule.log_snr(t).diff()[0].expand(20), rtol=1e-9)
    u = time_grid(schedule, ScorerSettings(solver="heun", steps=20, grid="uniform"))
    assert torch.allclose(u, torch.linspace(1e-5, 1, 21, dtype=torch.float64))
    with pytest.raises(ValueError, match="grid"):
        ScorerSettings(grid="cosine")


def test_bits_per_dim_formula():
    score, x = gaussian(SCHEDULES["linear"]())
    r = log_volume_growth(score, x, ScorerSettings(divergence="exact", **TIGHT))
    assert torch.allclose(r.bits_per_dim, -r.logp / (18 * math.log(2)) + 7)


@pytest.fixture(scope="module")
def unet_score():
    return DiffusersScore(tiny_unet(), LinearVP(1000, 1e-4, 0.02))


def test_hutchinson_is_unbiased_at_a_point(unet_score):
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    t = torch.tensor(0.4, dtype=torch.float64)
    _, exact = exact_divergence(unet_score, x, t)
    for kind in ("rademacher", "gaussian"):
        g = torch.Generator().manual_seed(1)
        n = 512
        probes = (torch.randint(0, 2, (n, *x.shape), generator=g, dtype=torch.float64) * 2 - 1
                  if kind == "rademacher" else torch.randn((n, *x.shape), generator=g, dtype=torch.float64))
        f, rows = drift_and_vjps(unet_score, x, t, probes)
        est = (rows * probes).flatten(2).sum(2)  # [n, B]: one estimate per probe
        assert torch.allclose(hutchinson_divergence(unet_score, x, t, probes[:3])[1], est[:3].mean(0))
        se = est.std(0) / math.sqrt(n)
        assert torch.all((est.mean(0) - exact).abs() < 4 * se + 1e-9), (kind, est.mean(0), exact, se)
        assert torch.allclose(f, drift(unet_score, x, t))


def test_exact_divergence_matches_jacobian_trace():
    unet_score = DiffusersScore(tiny_unet().double(), LinearVP(1000, 1e-4, 0.02))
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1
    t = torch.tensor(0.2, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: drift(unet_score, z, t), x)
    _, div = exact_divergence(unet_score, x, t, chunk=7)
    assert float(div[0]) == pytest.approx(float(J.reshape(64, 64).trace()), rel=1e-9, abs=1e-9)


def test_hutchinson_volume_is_unbiased_over_seeds(unet_score):
    """Same grid, so the trajectory is shared: the mean over seeds of V estimates exact V."""
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    grid = dict(solver="heun", steps=4)
    exact = log_volume_growth(unet_score, x, ScorerSettings(divergence="exact", **grid)).log_volume_growth
    Vs = torch.stack([log_volume_growth(unet_score, x, ScorerSettings(seed=s, **grid)).log_volume_growth
                      for s in range(48)])
    se = Vs.std(0) / math.sqrt(len(Vs))
    assert torch.all((Vs.mean(0) - exact).abs() < 4 * se), (Vs.mean(0), exact, se)
    assert torch.all(Vs.std(0) > 0)


def test_batch_order_and_determinism(unet_score):
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    for settings in (ScorerSettings(rtol=1e-3, atol=1e-3), ScorerSettings(solver="rk4", steps=5, probes=2)):
        whole = log_volume_growth(unet_score, x, settings).log_volume_growth
        again = log_volume_growth(unet_score, x, settings).log_volume_growth
        one_by_one = torch.cat([log_volume_growth(unet_score, x[i:i + 1], settings).log_volume_growth for i in range(3)])
        reversed_ = log_volume_growth(unet_score, x.flip(0), settings).log_volume_growth.flip(0)
        assert torch.equal(whole, again)
        assert torch.allclose(whole, one_by_one, rtol=1e-6, atol=1e-6)
        assert torch.allclose(whole, reversed_, rtol=1e-6, atol=1e-6)
    other_seed = log_volume_growth(unet_score, x, ScorerSettings(solver="rk4", steps=5, probes=2, seed=1))
    assert not torch.allclose(other_seed.log_volume_growth, whole)


@pytest.mark.parametrize("bad", [dict(divergence="hutch"), dict(solver="rk45"), dict(probes=0),
                                 dict(steps=0), dict(rtol=0.0), dict(eps=0.0), dict(eps=1.0)])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError):
        ScorerSettings(**bad)
