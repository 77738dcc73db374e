import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler, ScoreSdeVeScheduler

from pipeline.score.schedules import (InterpolatedVP, LinearVP, ScaledLinearVP, VESchedule,
                                schedule_from_scheduler)

T = torch.linspace(1e-5, 1.0, 101, dtype=torch.float64)


def finite_difference_beta(schedule, t, h=1e-6):
    return -(schedule.log_abar(t + h) - schedule.log_abar(t - h)) / (2 * h)


@pytest.mark.parametrize("make", [
    lambda: LinearVP(1000, 1e-4, 0.02),
    lambda: ScaledLinearVP(1000, 8.5e-4, 0.012),
    lambda: InterpolatedVP(DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.numpy()),
])
def test_beta_is_minus_derivative_of_log_abar(make):
    """A central difference at h = 1e-6 errs by h^2 |beta''| / 6 (< 1e-8 here) plus rounding,
    2^-52 |log abar| / h < 3e-9 for |log abar| < 12; PCHIP's beta is continuous but its slope
    jumps at the knots (every 1/N), where the difference errs by up to h |jump| < 1e-5 beta."""
    s = make()
    t = T[1:-1]
    assert torch.allclose(s.beta(t), finite_difference_beta(s, t), rtol=1e-5, atol=1e-8)
    assert torch.all(s.beta(t) > 0)
    assert s.log_abar(torch.tensor(0.0, dtype=torch.float64)).abs() < 1e-12


def test_linear_closed_form():
    s = LinearVP(1000, 1e-4, 0.02)
    t = torch.tensor(0.3, dtype=torch.float64)
    b0, b1 = 0.1, 20.0
    assert float(s.beta(t)) == pytest.approx(b0 + 0.3 * (b1 - b0))
    assert float(s.log_abar(t)) == pytest.approx(-(b0 * 0.3 + (b1 - b0) * 0.09 / 2))
    assert float(s.timestep(t)) == pytest.approx(0.3 * 999)


def test_scaled_linear_closed_form():
    s = ScaledLinearVP(1000, 8.5e-4, 0.012)
    r0, r1 = math.sqrt(8.5e-4), math.sqrt(0.012)
    t = 0.7
    assert float(s.beta(torch.tensor(t, dtype=torch.float64))) == pytest.approx(1000 * (r0 + t * (r1 - r0)) ** 2)
    # integral of N (r0 + s dr)^2 from 0 to t = N ((r0 + t dr)^3 - r0^3) / (3 dr)
    expected = -1000 * ((r0 + t * (r1 - r0)) ** 3 - r0**3) / (3 * (r1 - r0))
    assert float(s.log_abar(torch.tensor(t, dtype=torch.float64))) == pytest.approx(expected)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_continuous_limit_tracks_discrete_alphas_cumprod(beta_schedule):
    sch = DDPMScheduler(beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02)
    s = schedule_from_scheduler(sch)
    k = torch.arange(1000, dtype=torch.float64)
    continuous = s.log_abar((k + 1) / 1000)
    discrete = torch.log(sch.alphas_cumprod.double())
    # the discrete sum of log(1 - beta_i) is -sum beta_i - sum beta_i^2 / 2 - ...: the squares add
    # at most (k + 1) beta_end^2 / 2 = 0.2 at k = 999 (2% of |log abar| ~ 10); the continuous
    # integral and the discrete sum of the linear betas differ by half a step, beta_end / 2 = 0.01
    assert torch.allclose(continuous, discrete, rtol=0.02, atol=0.01)


def test_interpolation_passes_through_the_table_and_is_monotone():
    sch = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    s = schedule_from_scheduler(sch)
    assert isinstance(s, InterpolatedVP)
    k = torch.arange(1000, dtype=torch.float64)
    table = torch.log(sch.alphas_cumprod.double())
    # the spline interpolates its knots exactly, up to float64 rounding of |log abar| < 25
    assert torch.allclose(s.log_abar((k + 1) / 1000), table, rtol=0, atol=64 * 2.0**-52 * 25)
    dense = s.log_abar(torch.linspace(0, 1, 5001, dtype=torch.float64))
    assert torch.all(dense[1:] < dense[:-1])


def test_trained_betas_use_interpolation():
    betas = np.linspace(1e-4, 0.02, 100)
    s = schedule_from_scheduler(DDPMScheduler(num_train_timesteps=100, trained_betas=betas))
    assert isinstance(s, InterpolatedVP)
    assert s.N == 100


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, PNDMScheduler])
def test_discrete_schedulers_give_linear_vp(cls):
    s = schedule_from_scheduler(cls(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    assert isinstance(s, LinearVP) and s.b0 == pytest.approx(0.1) and s.b1 == pytest.approx(20.0)


def test_ve_schedule():
    s = schedule_from_scheduler(ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0))
    assert isinstance(s, VESchedule)
    assert float(s.sigma(torch.tensor(0.0))) == pytest.approx(0.01)
    assert float(s.sigma(torch.tensor(1.0))) == pytest.approx(50.0)
    assert float(s.timestep(torch.tensor(1.0))) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESchedule(1.0, 0.5)


def test_sigma_is_accurate_near_zero():
    s = LinearVP(1000, 1e-4, 0.02)
    t = torch.tensor(1e-5, dtype=torch.float64)
    exact = math.sqrt(-math.expm1(float(s.log_abar(t))))
    assert float(s.sigma(t)) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("make", [
    lambda: LinearVP(1000, 1e-4, 0.02),
    lambda: ScaledLinearVP(1000, 8.5e-4, 0.012),
    lambda: InterpolatedVP(DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.numpy()),
    lambda: VESchedule(0.01, 50.0),
])
def test_a_schedule_evaluates_on_the_times_device_without_reading_it_back(make):
    """What a drift evaluation asks of the schedule at a time held on the images' device (sigma,
    log alpha, the network's timestep, abar for v- and x0-prediction, the drift's coefficients)
    stays on that device and never reads the time back to the host: on a GPU each read is a
    synchronisation. The "meta" device holds no values, so any read raises; the values are the
    host's, which the tests above hold to the scheduler's table and to finite differences."""
    s = make()
    host = T[[1, 50, 100]]
    for t in (host.to("meta"), host[1].to("meta")):
        for name in ("sigma", "log_alpha", "timestep", "abar", "drift_coefficients"):
            fn = getattr(s, name, None)
            if fn is None:
                continue
            out = fn(t)
            for o in out if isinstance(out, tuple) else (out,):
                assert o.device.type == "meta" and o.shape == t.shape, (name, o)
