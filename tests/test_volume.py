"""The ODE engine against exact answers: Gaussian data, zero networks, exact divergence.

Tolerances come from the method's error, never from a run of this code:
- dopri5 at tolerance `tol` keeps each step's local error under tol (1 + |y|) (its error
  control); over n = nfe / 6 steps the global error is at most n tol (1 + |y|), times the flow
  map's condition where an error in x is carried forward (`dopri5_bound`).
- float64 rounding: a sum of D terms of size |y| errs by at most D |y| 2^-52 (`F64`).
- Monte Carlo: a mean of R independent estimates is within 4 standard errors of its
  expectation with probability 1 - 6e-5.
- Fixed grids: errors fall at the solver's order (Euler 1, Heun 2, RK4 4) as steps double.
"""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.score.models import DiffusersScore
from pipeline.score.schedules import LinearVP, ScaledLinearVP, VESchedule, schedule_from_scheduler
from pipeline.score.volume import (ScorerSettings, drift, exact_divergence, field_and_vjps, hutchinson_divergence,
                             log_volume_growth, network_precision, stage_weights, time_grid)
from tests.exact import FullGaussianScore, GaussianScore, ZeroScore, tiny_unet

TOL = 1e-8
TIGHT = dict(solver="dopri5", rtol=TOL, atol=TOL)
EPS = 1e-5
F64 = 2.0**-52

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


def dopri5_bound(nfe, scale, condition=1.0):
    """Global error bound of a dopri5 solve at TOL: (nfe / 6 steps) TOL (1 + scale) condition."""
    return float(nfe) / 6 * TOL * (1 + float(scale)) * condition


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("divergence", ["exact", "gaussian"])
def test_gaussian_data_matches_closed_form(name, divergence):
    score, x = gaussian(SCHEDULES[name]())
    r = log_volume_growth(score, x, ScorerSettings(divergence=divergence, probes=1, **TIGHT))
    nfe = int(r.nfe.max())
    # the flow scales coordinate d by sqrt(var_d(1) / var_d(eps)): an error in x grows by that
    m1, v1 = score.mean_var(1.0)
    condition = float(torch.sqrt(v1 / score.mean_var(EPS)[1]).max())
    x1_bound = dopri5_bound(nfe, r.latent.abs().max(), condition)
    assert torch.allclose(r.latent, score.latent(x, EPS), rtol=0, atol=x1_bound)
    assert torch.allclose(r.logp, r.prior_logp + r.log_volume_growth, rtol=0, atol=1e-12 * r.logp.abs().max())
    if divergence == "exact":
        expected_V = score.log_volume_growth(EPS)
        V_bound = dopri5_bound(nfe, abs(expected_V))
        assert torch.allclose(r.log_volume_growth, torch.full((3,), expected_V, dtype=torch.float64),
                              rtol=0, atol=V_bound)
        # log p(x) = log p_1(x_1) + V with the true marginal p_1 in place of the prior; an error
        # in x_1 moves log p_1 by |grad log p_1| = |x_1 - m_1| / v_1 per unit
        true_p1 = score.logp(r.latent, 1.0)
        grad = ((r.latent.double() - m1) / v1).flatten(1).abs().sum(1)
        assert torch.all((true_p1 + r.log_volume_growth - score.logp(x, EPS)).abs() <= V_bound + grad * x1_bound)


@pytest.mark.parametrize("solver", ["dopri5", "heun"])
def test_rademacher_is_exact_for_a_diagonal_jacobian(solver):
    """v_i^2 = 1: with a diagonal Jacobian a Rademacher probe returns the trace itself, so fresh
    and fixed probes give the exact-divergence V on the same grid, up to float64 rounding."""
    score, x = gaussian(SCHEDULES["linear"]())
    grid = TIGHT if solver == "dopri5" else dict(solver="heun", steps=16)
    exact = log_volume_growth(score, x, ScorerSettings(divergence="exact", **grid))
    probed = log_volume_growth(score, x, ScorerSettings(divergence="rademacher", **grid))
    bound = 18 * F64 * float(probed.nfe.max()) * exact.log_volume_growth.abs().max()
    assert torch.allclose(probed.log_volume_growth, exact.log_volume_growth, rtol=0, atol=float(bound) + 1e-12)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("solver", ["heun", "rk4", "dopri5"])
def test_zero_network_volume(name, solver):
    """eps_hat = 0: f = -beta x / 2, so V = D/2 (log abar(1) - log abar(eps)), the linear part
    that the solver integrates in closed form; x_1 = sqrt(abar(1) / abar(eps)) x."""
    schedule = SCHEDULES[name]()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    r = log_volume_growth(ZeroScore(schedule), x, ScorerSettings(divergence="exact", solver=solver, steps=4))
    la = lambda t: float(schedule.log_abar(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    expected = 16 / 2 * (la(1.0) - la(EPS))
    assert r.log_volume_growth.tolist() == pytest.approx([expected] * 2, rel=64 * F64)
    assert torch.allclose(r.latent, x * math.exp((la(1.0) - la(EPS)) / 2), rtol=64 * F64, atol=0)
    assert r.prior_logp.tolist() == pytest.approx(
        (-0.5 * (r.latent.flatten(1) ** 2).sum(1) - 8 * math.log(2 * math.pi)).tolist(), rel=64 * F64)


@pytest.mark.parametrize("grid,s", [("log_snr", 0.3), ("log_snr", 1e-3), ("uniform", 0.3)])
@pytest.mark.parametrize("solver,steps,order", [("euler", 200, 1), ("heun", 40, 2), ("rk4", 10, 4)])
def test_fixed_grid_solvers_converge_at_their_order(solver, steps, order, grid, s):
    """Doubling the steps divides the error in V by 2^order on the log-SNR grid, also on
    sharply concentrated data (s = 0.001); on the grid uniform in t by at least 2^(order/2)."""
    score, x = gaussian(SCHEDULES["linear"]())
    score.s = score.s.clamp(min=s) if s > 0.1 else torch.full_like(score.s, s)
    exact = score.log_volume_growth(EPS)
    err = []
    for n in (steps, 2 * steps):
        r = log_volume_growth(score, x[:1], ScorerSettings(divergence="exact", solver=solver, steps=n, grid=grid))
        assert int(r.nfe) == n * {"euler": 1, "heun": 2, "rk4": 4}[solver]
        err.append(abs(float(r.log_volume_growth) - exact))
    low = 0.8 * 2**order if grid == "log_snr" else 2 ** (order / 2)
    assert low < err[0] / err[1] < 1.25 * 2**order, err
    assert err[1] < 0.02 * exact


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "ve"])
def test_log_snr_grid_integrates_concentrated_data(name):
    """Data concentrated like 8-bit images under a memorizing model (N(mu, 0.001^2)): the path is
    nearly straight in sbar and q = sbar div g nearly constant in u = log sbar, so Heun steps of
    du = 1 come within 4% of V and the error falls as du^2 (second order)."""
    schedule = SCHEDULES[name]()
    score, x = gaussian(schedule)
    score.s = torch.full_like(score.s, 1e-3)
    exact = score.log_volume_growth(EPS)
    span = float(torch.log(schedule.sigma_bar(torch.tensor([1.0, EPS], dtype=torch.float64))).diff().abs())
    for du in (1.0, 1 / 3):
        steps = math.ceil(span / du)
        r = log_volume_growth(score, x[:1], ScorerSettings(divergence="exact", solver="heun", steps=steps))
        assert abs(float(r.log_volume_growth) - exact) < 0.04 * du**2 * abs(exact), (steps, r.log_volume_growth, exact)


def test_stage_weights_are_exact_for_their_integrands():
    """Heun's weighted rule integrates dV/dsbar = 1/sbar (q constant) and = 1 (q ~ sbar) exactly
    over each step; Euler's integrates 1/sbar exactly; rk4 keeps its own weights."""
    sbar = torch.exp(torch.linspace(-7, 5, 9, dtype=torch.float64))
    ds, du = sbar.diff(), torch.log(sbar[1:] / sbar[:-1])
    w = stage_weights(sbar, "heun") * (ds / 2)[:, None]  # weights on r(s_0), r(s_1)
    assert torch.allclose(w[:, 0] / sbar[:-1] + w[:, 1] / sbar[1:], du, rtol=1e-12)
    assert torch.allclose(w.sum(1), ds, rtol=1e-12)
    assert torch.all(w > 0)
    e = stage_weights(sbar, "euler")[:, 0] * ds
    assert torch.allclose(e / sbar[:-1], du, rtol=1e-12)
    assert stage_weights(sbar, "rk4") is None


def test_time_grid_is_uniform_in_log_snr():
    for name, make in SCHEDULES.items():
        schedule = make()
        t = time_grid(schedule, ScorerSettings(solver="heun", steps=20, eps=1e-5))
        assert t[0] == 1e-5 and t[-1] == 1.0 and bool((t.diff() > 0).all()), name
        lam = schedule.log_snr(t).diff()
        assert torch.allclose(lam, lam[0].expand(20), rtol=1e-9), name
        # log and exp err by 2^-52 in log sbar; t inherits that divided by d log sbar / dt
        log_sbar = torch.log(schedule.sigma_bar(t))
        slope = float((log_sbar.diff() / t.diff()).min())
        back = schedule.t_of_sigma_bar(schedule.sigma_bar(t))
        assert torch.allclose(back, t, rtol=0, atol=16 * F64 * float(log_sbar.abs().max()) / slope), name
    u = time_grid(SCHEDULES["linear"](), ScorerSettings(solver="heun", steps=20, grid="uniform"))
    assert torch.allclose(u, torch.linspace(1e-5, 1, 21, dtype=torch.float64))


@pytest.mark.parametrize("name", ["linear", "ve"])
def test_the_window_and_the_standard_error_match_closed_forms(name):
    """Isotropic Gaussian data (one s for every pixel): the Jacobian of g is a(t) I, so V over
    [t_j, 1] is 1/2 sum_d log(var_d(1) / var_d(t_j)) (t_j the first grid time at or after
    --window-start), and a Rademacher probe gives tr A exactly: V's standard error is 0 but for
    float32 rounding. Tolerances: RK4's error at 64 steps is 16/15 of its change from 64 to 128
    steps (4th order), taken twice; each of the D elements of r = v^T A carries a few float32
    roundings (delta <= 8 2^-24), so 2 (|r|^2 - d^2 / D) <= 2 a^2 D delta^2 per evaluation and
    the standard error is at most delta sqrt(2 / D) |V - its linear part|."""
    from pipeline.score.volume import window_index

    schedule = SCHEDULES[name]()
    score = GaussianScore(torch.zeros(1, 3, 3), torch.full((1, 3, 3), 0.4), schedule)
    x = torch.randn(2, 1, 3, 3)
    t = time_grid(schedule, ScorerSettings(solver="rk4", steps=64))
    j = window_index(t, 0.05)
    assert float(t[j - 1]) < 0.05 <= float(t[j])
    t0 = float(t[j])  # a time of both grids (128 log-SNR steps halve each of 64's)
    fine, coarse = (log_volume_growth(score, x, ScorerSettings(solver="rk4", steps=n, window_start=t0))
                    for n in (128, 64))
    window = 0.5 * float(torch.log(score.mean_var(1.0)[1] / score.mean_var(t0)[1]).sum())
    V = score.log_volume_growth(EPS)
    for name, want in (("log_volume_growth", V), ("window_volume_growth", window)):
        got = getattr(coarse, name)
        bound = 2 * 16 / 15 * float((got - getattr(fine, name)).abs().max()) + 64 * F64 * abs(want)
        assert torch.all((got - want).abs() <= bound), (name, got, want, bound)
    assert 0 < window < V
    la = schedule.log_alpha(torch.tensor([EPS, 1.0], dtype=torch.float64))
    integral = abs(V - 9 * float(la[1] - la[0]))
    assert torch.all(coarse.log_volume_growth_se <= 8 * 2.0**-24 * math.sqrt(2 / 9) * integral)
    assert torch.all(coarse.window_volume_growth_se <= coarse.log_volume_growth_se + 1e-30)


def test_bits_per_dim_formula():
    """8-bit data k/255 in [lo, hi] has bins (hi - lo)/255 wide: P(bin) = p(x) bin^D, so
    bits/dim = -logp / (D ln 2) + log2(255 / (hi - lo)): 6.994 for [-1, 1], 7.994 for [0, 1]."""
    score, x = gaussian(SCHEDULES["linear"]())
    r = log_volume_growth(score, x, ScorerSettings(divergence="exact", **TIGHT))
    assert torch.allclose(r.bits_per_dim, -r.logp / (18 * math.log(2)) + math.log2(127.5))
    score.data_range = (0.0, 1.0)
    r = log_volume_growth(score, x, ScorerSettings(divergence="exact", **TIGHT))
    assert torch.allclose(r.bits_per_dim, -r.logp / (18 * math.log(2)) + math.log2(255))


@pytest.fixture(scope="module")
def unet_score():
    return DiffusersScore(tiny_unet(), LinearVP(1000, 1e-4, 0.02))


def test_hutchinson_is_unbiased_at_a_point():
    # a float64 network: the Jacobian check below is against float64 rounding
    unet_score = DiffusersScore(tiny_unet().double(), LinearVP(1000, 1e-4, 0.02))
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    t = torch.tensor(0.4, dtype=torch.float64)
    field = lambda z: drift(unet_score, z, t)  # noqa: E731
    _, exact = exact_divergence(field, x)
    # each image's 64 x 64 Jacobian, by autograd's own jacobian (not the code under test)
    J = torch.stack([torch.autograd.functional.jacobian(lambda z: drift(unet_score, z, t), x[b:b + 1]).reshape(64, 64)
                     for b in range(2)])
    for kind in ("rademacher", "gaussian"):
        g = torch.Generator().manual_seed(1)
        n = 512
        probes = (torch.randint(0, 2, (n, *x.shape), generator=g, dtype=torch.float64) * 2 - 1
                  if kind == "rademacher" else torch.randn((n, *x.shape), generator=g, dtype=torch.float64))
        f, rows = field_and_vjps(field, x, probes)
        est = (rows * probes).flatten(2).sum(2)  # [n, B]: one estimate per probe
        # the estimate of 3 probes is the mean of v^T J v; float64 sums of 4,096 products: 2 * 4096 * eps * sum |terms|
        v = probes[:3].reshape(3, 2, 64)
        quad = torch.einsum("kbi,bij,kbj->kb", v, J, v)
        bound = 2 * 4096 * F64 * torch.einsum("kbi,bij,kbj->kb", v.abs(), J.abs(), v.abs()).max(0).values
        assert torch.all((hutchinson_divergence(field, x, probes[:3])[1] - quad.mean(0)).abs() <= bound)
        se = est.std(0) / math.sqrt(n)
        assert torch.all((est.mean(0) - exact).abs() < 4 * se + 1e-9), (kind, est.mean(0), exact, se)
        assert torch.allclose(f, drift(unet_score, x, t))


def test_exact_divergence_matches_jacobian_trace():
    unet_score = DiffusersScore(tiny_unet().double(), LinearVP(1000, 1e-4, 0.02))
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1
    t = torch.tensor(0.2, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: drift(unet_score, z, t), x)
    _, div = exact_divergence(lambda z: drift(unet_score, z, t), x, chunk=7)
    # two sums of 64 float64 products of size |J|: 64 |J| 2^-52 each
    assert float(div[0]) == pytest.approx(float(J.reshape(64, 64).trace()), abs=128 * F64 * float(J.abs().max()) * 64)


@pytest.mark.parametrize("probe_mode", ["fresh", "fixed"])
def test_hutchinson_volume_is_unbiased_over_seeds(unet_score, probe_mode):
    """Same grid, so the trajectory is shared: the mean over seeds of V estimates exact V."""
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    grid = dict(solver="heun", steps=4)
    exact = log_volume_growth(unet_score, x, ScorerSettings(divergence="exact", **grid)).log_volume_growth
    Vs = torch.stack([log_volume_growth(unet_score, x, ScorerSettings(seed=s, probe_mode=probe_mode, **grid))
                      .log_volume_growth for s in range(48)])
    se = Vs.std(0) / math.sqrt(len(Vs))
    assert torch.all((Vs.mean(0) - exact).abs() < 4 * se), (Vs.mean(0), exact, se)
    assert torch.all(Vs.std(0) > 0)


def test_the_closed_form_jacobian_is_the_rates_own():
    """FullGaussianScore.rate_jacobian (what the variance tests below build on) is autograd's
    Jacobian of scaled_rate, to float64 rounding of a 9x9 solve (D^2 2^-52 of its largest entry)."""
    from pipeline.score.volume import scaled_rate

    score = FullGaussianScore.random(dim=9, schedule=SCHEDULES["linear"](), seed=3)
    y = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    for t in (0.01, 0.5, 1.0):
        tt = torch.tensor(t, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda z: scaled_rate(score, tt)(z).flatten(), y).reshape(9, 9)
        assert torch.allclose(J, score.rate_jacobian(tt), rtol=0, atol=81 * F64 * float(J.abs().max()))


def test_fresh_probes_average_the_noise_as_predicted():
    """Correlated Gaussian data N(mu, S): the Jacobian of g is J_k = sigma alpha S_t^-1 at
    evaluation k, whatever x. With quadrature weights c_k, V_hat = sum_k c_k v_k^T J_k v_k, whose
    variance over Rademacher probes is known exactly (Var v^T A v = 2 sum_{i != j} A_ij^2):
        fixed (v_k = v):  2 |offdiag(sum_k c_k J_k)|^2       fresh: sum_k c_k^2 2 |offdiag J_k|^2
    The sample variances over R seeds match these within 4 of their own standard errors, and fresh
    is the lower at equal cost. Each solve's own variance estimate (log_volume_growth_se^2, from
    its probes: probe_variance) has a known expectation too, for each evaluation's (fresh) or the
    whole solve's (fixed) matrix A: 2 (|A|_F^2 - ((tr A)^2 + Var)/D), Var = 2 |offdiag A|^2; its
    mean over the seeds matches that within 4 standard errors, and it is never below the truth
    by more than the (tr A)^2 + Var over D it subtracts."""
    schedule = SCHEDULES["linear"]()
    score = FullGaussianScore.random(dim=9, schedule=schedule, seed=3)
    x = score.sample(1, seed=4).view(1, 1, 3, 3)
    settings = ScorerSettings(solver="heun", steps=6)
    t = time_grid(schedule, settings)
    sbar = schedule.sigma_bar(t)
    c = (stage_weights(sbar, "heun") * (sbar.diff() / 2)[:, None]).reshape(-1)  # weights on dV/dsbar
    stage_t = torch.stack([t[:-1], t[1:]], 1).reshape(-1)  # Heun evaluates at both ends of a step
    J = torch.stack([score.rate_jacobian(tk) for tk in stage_t])  # [K, D, D]
    off = lambda A: (A - torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1))).square().sum((-2, -1))  # noqa: E731
    predicted = {"fixed": float(2 * off((c[:, None, None] * J).sum(0))), "fresh": float(2 * (c**2 * off(J)).sum())}
    D = J.shape[-1]

    def estimate(A):  # E[2 (|r|^2 - d^2 / D)] for one Rademacher probe of a symmetric A: [..., D, D] -> [...]
        tr = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)
        return 2 * (A.square().sum((-2, -1)) - (tr**2 + 2 * off(A)) / D)
    expected_se2 = {"fixed": float(estimate((c[:, None, None] * J).sum(0))), "fresh": float((c**2 * estimate(J)).sum())}
    R = 400
    for mode, var in predicted.items():
        runs = [log_volume_growth(score, x, ScorerSettings(solver="heun", steps=6, seed=s, probe_mode=mode))
                for s in range(R)]
        V = np.array([float(r.log_volume_growth) for r in runs])
        # the sample variance's standard error: sqrt((m4 - var^2) / R), m4 the 4th central moment
        m4 = float(np.mean((V - V.mean()) ** 4))
        se = math.sqrt(max(m4 - V.var() ** 2, 0) / R)
        assert abs(V.var(ddof=1) - var) < 4 * se + 1e-9, (mode, V.var(ddof=1), var, se)
        se2 = np.array([float(r.log_volume_growth_se) ** 2 for r in runs])
        assert abs(se2.mean() - expected_se2[mode]) < 4 * se2.std(ddof=1) / math.sqrt(R) + 1e-9, (mode, se2.mean())
        assert expected_se2[mode] <= var + 1e-9  # the estimate's slack: the diagonal it cannot see
    assert predicted["fresh"] < predicted["fixed"] / 2


def test_batch_order_and_determinism(unet_score):
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    for settings in (ScorerSettings(solver="dopri5", rtol=1e-3, atol=1e-3),
                     ScorerSettings(solver="rk4", steps=5, probes=2),
                     ScorerSettings(solver="heun", steps=4, probe_mode="fixed")):
        whole = log_volume_growth(unet_score, x, settings).log_volume_growth
        again = log_volume_growth(unet_score, x, settings).log_volume_growth
        one_by_one = torch.cat([log_volume_growth(unet_score, x[i:i + 1], settings).log_volume_growth for i in range(3)])
        reversed_ = log_volume_growth(unet_score, x.flip(0), settings).log_volume_growth.flip(0)
        assert torch.equal(whole, again)
        # the network runs in float32: batching may change its rounding (float32 eps times the
        # sum over the NFE of |c_k div g|, bounded by |V|) and no more
        bound = 2.0**-23 * 64 * float(whole.abs().max())
        assert torch.allclose(whole, one_by_one, rtol=0, atol=bound)
        assert torch.allclose(whole, reversed_, rtol=0, atol=bound)
        other_seed = log_volume_growth(unet_score, x, ScorerSettings(**{**settings.to_dict(), "seed": 1}))
        assert not torch.allclose(other_seed.log_volume_growth, whole)


def test_precision_runs_the_network_in_its_arithmetic(unet_score):
    """bf16 autocasts the network's convolutions; fp32 switches TF32 off, and every mode puts the
    global flags back."""
    seen = []
    hook = unet_score.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        x = torch.rand(2, 1, 8, 8) * 2 - 1
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            seen.clear()
            with network_precision(precision, x.device):
                assert torch.backends.cudnn.allow_tf32 is False
            r = log_volume_growth(unet_score, x, ScorerSettings(solver="euler", steps=2, precision=precision))
            assert set(seen) == {dtype} and r.log_volume_growth.dtype == torch.float64
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
        with network_precision("tf32", x.device):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        hook.remove()


def test_probe_mode_defaults_by_solver():
    assert ScorerSettings(solver="heun").probe_mode == "fresh"
    assert ScorerSettings(solver="dopri5").probe_mode == "fixed"
    with pytest.raises(ValueError, match="fixed-grid"):
        ScorerSettings(solver="dopri5", probe_mode="fresh")


@pytest.mark.parametrize("bad", [dict(divergence="hutch"), dict(solver="rk45"), dict(probes=0),
                                 dict(steps=0), dict(rtol=0.0), dict(eps=0.0), dict(eps=1.0),
                                 dict(window_start=1.0), dict(window_start=1e-9), dict(loss_t=0.0),
                                 dict(loss_noises=-1),
                                 dict(grid="cosine"), dict(probe_mode="sometimes"), dict(precision="fp8")])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError):
        ScorerSettings(**bad)


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_evaluation_times_are_the_solvers_own(name, solver, monkeypatch):
    """A fixed grid's evaluations take their times from a table made once a solve (no read of
    sbar back to the host: on a GPU that drained the device at every evaluation). The table's
    sbar are torchdiffeq's own, bit for bit (the same float64 operations in the same order), and
    a solve with the table gives the same V, bit for bit, as times computed from each sbar."""
    from torchdiffeq import odeint

    from pipeline.score.volume import FIXED_GRID_SOLVERS, HOST_GRID, AugmentedDrift, stage_sbar

    schedule = SCHEDULES[name]()
    settings = ScorerSettings(solver=solver, steps=5)
    sbar = schedule.sigma_bar(time_grid(schedule, settings))
    seen = []

    def record(s, y):
        seen.append(s.clone())
        return -y

    odeint(record, torch.ones(2, dtype=torch.float64), sbar, method=FIXED_GRID_SOLVERS[solver])
    assert torch.equal(torch.stack(seen), stage_sbar(sbar, solver))
    seen.clear()  # the host-grid method memclean solves with: the same steps, stepped on the host
    odeint(record, torch.ones(2, dtype=torch.float64), sbar, method=HOST_GRID + FIXED_GRID_SOLVERS[solver],
           options={"host_t": sbar})
    assert torch.equal(torch.stack(seen), stage_sbar(sbar, solver))

    score, x = gaussian(schedule)
    tabled = log_volume_growth(score, x, settings)
    original = AugmentedDrift.forward

    def from_sbar(self, s, state):  # each evaluation's t computed from the sbar torchdiffeq passes
        self.times = None
        return original(self, s, state)
    monkeypatch.setattr(AugmentedDrift, "forward", from_sbar)
    direct = log_volume_growth(score, x, settings)
    assert torch.equal(tabled.log_volume_growth, direct.log_volume_growth)
    assert torch.equal(tabled.latent, direct.latent) and torch.equal(tabled.log_volume_growth_se, direct.log_volume_growth_se)


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_a_batch_is_scored_without_reading_the_device(name, solver, monkeypatch):
    """V (the fixed-grid solve: torchdiffeq's steps, the probes, the drift, the variance) and the
    loss of a batch on the "meta" device, which holds no values: any read of a device tensor on
    the host (a Python bool, float or int of it, indexing with it, torchdiffeq's loop comparing
    times held there) raises. On a GPU each such read drains the device. What a batch still copies
    to the device as its solve starts (the grid, its evaluation times, the probes' keys: each a
    synchronisation) and back (the images' hash, the results) is counted on a GPU by
    benchmarks/gpu.py. autocast takes no meta device: precision is left out."""
    import contextlib

    import pipeline.score.volume as volume
    from pipeline.score.loss import denoising_loss

    monkeypatch.setattr(volume, "network_precision", lambda precision, device: contextlib.nullcontext())
    # the prediction type changes the score's last arithmetic, not the steps: each once, with Euler
    for prediction in ("epsilon", "v_prediction", "sample") if solver == "euler" else ("epsilon",):
        score = DiffusersScore(tiny_unet(channels=2).to("meta"), SCHEDULES[name](), prediction_type=prediction)
        x = torch.empty(3, 2, 8, 8, device="meta")
        # the exact divergence's path (D backward passes) is the same whatever the schedule: once
        exact = ("exact",) if name == "linear" and prediction == "epsilon" else ()
        for divergence in ("rademacher", "gaussian") + exact:
            r = log_volume_growth(score, x, ScorerSettings(solver=solver, steps=2, divergence=divergence),
                                  keys=[1, 2, 3])
            assert r.log_volume_growth.device.type == "meta" and r.log_volume_growth.shape == (3,)
        loss = denoising_loss(score, x, 0.1, 4, keys=[1, 2, 3])
        assert loss.denoising_loss.device.type == "meta"


def test_the_host_grid_takes_only_its_own_grid():
    """The host-grid methods step over host_t, not the t odeint hands them: host_t must be an
    increasing grid on the host, and t the same number of times (odeint's copy of it)."""
    from torchdiffeq import odeint

    from pipeline.score.volume import HOST_GRID

    grid = torch.linspace(0.1, 1.0, 4, dtype=torch.float64)
    y0 = torch.ones(2, dtype=torch.float64)
    out = odeint(lambda s, y: -y, y0, grid, method=HOST_GRID + "euler", options={"host_t": grid})
    assert out.shape == (4, 2)
    with pytest.raises(ValueError, match="increasing grid on the host"):
        odeint(lambda s, y: -y, y0, grid, method=HOST_GRID + "euler", options={"host_t": grid.flip(0)})
    with pytest.raises(ValueError, match="4 times, host_t 3"):
        odeint(lambda s, y: -y, y0, grid, method=HOST_GRID + "euler", options={"host_t": grid[:3]})
