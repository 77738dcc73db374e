"""Continuous-time noise schedules: the VP limit of a discrete scheduler, and VE.

Time convention (DESIGN.md): t in [eps, 1]; for discrete-time schedulers the network's
timestep argument is t (N - 1); the schedule is score_sde's VPSDE limit of the betas.
All schedule arithmetic is float64.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch


class Schedule(Protocol):
    """What the probability-flow ODE needs from a noise schedule: x_t = alpha(t) x_0 + sigma(t) eps."""

    kind: str  # "vp" or "ve"

    def drift_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [] -> (a, b) with f(x, t) = a x + b score(x, t)."""

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """t: [n] -> [n], the noise level sigma(t) of x_t."""

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """t: [n] -> [n], log of the signal scale alpha(t) (VE: 0)."""

    def sigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        """t: [n] -> [n], sigma / alpha: the noise level of x / alpha, strictly increasing in t."""

    def t_of_sigma_bar(self, sigma_bar: torch.Tensor) -> torch.Tensor:
        """The inverse of sigma_bar: [n] -> [n]."""

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, ...] -> [B], log density of the prior at t = 1."""

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """t: [n] -> [n], log signal-to-noise ratio -2 log sigma_bar, strictly decreasing in t."""


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def invert_increasing(fn, target: torch.Tensor, lo: float = 0.0, hi: float = 1.0,
                      iterations: int = 64) -> torch.Tensor:
    """t in [lo, hi] with fn(t) = target for a strictly increasing fn, by bisection: [n] -> [n].

    64 halvings of [0, 1] leave 5e-20, below float64's resolution at any t >= 1e-5 (1e-21).
    """
    target = _f64(target)
    a, b = torch.full_like(target, lo), torch.full_like(target, hi)
    for _ in range(iterations):
        mid = (a + b) / 2
        below = fn(mid) < target
        a, b = torch.where(below, mid, a), torch.where(below, b, mid)
    return (a + b) / 2


def _standard_normal_logp(z: torch.Tensor, std: float) -> torch.Tensor:
    """log N(z; 0, std^2 I) per sample: z [B, ...] -> [B]."""
    z = z.flatten(1).to(torch.float64)
    D = z.shape[1]
    return -0.5 * D * math.log(2 * math.pi * std**2) - 0.5 * (z**2).sum(1) / std**2


class VPSchedule:
    """x_t = sqrt(abar(t)) x_0 + sigma(t) eps with sigma^2 = 1 - abar; beta = -d log abar / dt.

    Subclasses define `log_abar(t)` and `beta(t)` on float64 tensors.
    """

    kind = "vp"

    def __init__(self, num_train_timesteps: int):
        self.N = int(num_train_timesteps)  # discrete steps the network was trained on

    def log_abar(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_abar(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sqrt(1 - abar(t)), computed as sqrt(-expm1(log abar)) for accuracy near t = 0."""
        return torch.sqrt(-torch.expm1(self.log_abar(t)))

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.log_abar(_f64(t))

    def sigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        """sqrt(1 / abar - 1), as sqrt(expm1(-log abar)) for accuracy near t = 0."""
        return torch.sqrt(torch.expm1(-self.log_abar(_f64(t))))

    def t_of_sigma_bar(self, sigma_bar: torch.Tensor) -> torch.Tensor:
        """Solve -log abar(t) = log(1 + sigma_bar^2) (bisection; subclasses with a closed form override)."""
        return invert_increasing(lambda t: -self.log_abar(t), torch.log1p(_f64(sigma_bar) ** 2))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """log(abar / (1 - abar)) = -2 log sigma_bar."""
        la = self.log_abar(_f64(t))
        return la - torch.log(-torch.expm1(la))

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The network's (float) timestep argument: t (N - 1)."""
        return t * (self.N - 1)

    def drift_coefficients(self, t):
        """f(x, t) = -1/2 beta(t) (x + score(x, t))."""
        half_beta = 0.5 * self.beta(t)
        return -half_beta, -half_beta

    def prior_logp(self, z):
        return _standard_normal_logp(z, 1.0)


class LinearVP(VPSchedule):
    """beta(t) = b0 + t (b1 - b0), b0 = N beta_start, b1 = N beta_end (score_sde VPSDE)."""

    def __init__(self, num_train_timesteps: int, beta_start: float, beta_end: float):
        super().__init__(num_train_timesteps)
        self.b0 = self.N * float(beta_start)
        self.b1 = self.N * float(beta_end)

    def beta(self, t):
        return self.b0 + t * (self.b1 - self.b0)

    def log_abar(self, t):
        return -(self.b0 * t + 0.5 * (self.b1 - self.b0) * t**2)

    def t_of_sigma_bar(self, sigma_bar):
        """The root of (b1 - b0)/2 t^2 + b0 t = L, L = log(1 + sigma_bar^2), in the form without
        cancellation: t = 2 L / (b0 + sqrt(b0^2 + 2 (b1 - b0) L))."""
        L = torch.log1p(_f64(sigma_bar) ** 2)
        return 2 * L / (self.b0 + torch.sqrt(self.b0**2 + 2 * (self.b1 - self.b0) * L))


class ScaledLinearVP(VPSchedule):
    """beta(t) = N (r0 + t (r1 - r0))^2 with r = sqrt(beta): the limit of 'scaled_linear'."""

    def __init__(self, num_train_timesteps: int, beta_start: float, beta_end: float):
        super().__init__(num_train_timesteps)
        self.r0 = math.sqrt(beta_start)
        self.dr = math.sqrt(beta_end) - self.r0

    def beta(self, t):
        return self.N * (self.r0 + t * self.dr) ** 2

    def log_abar(self, t):
        # -N integral_0^t (r0 + s dr)^2 ds, expanded so that dr = 0 needs no special case
        r0, dr = self.r0, self.dr
        return -self.N * (r0**2 * t + r0 * dr * t**2 + dr**2 * t**3 / 3)


class InterpolatedVP(VPSchedule):
    """Monotone cubic (PCHIP) interpolation of log abar through ((k+1)/N, log abar_k), (0, 0).

    For schedules with no closed-form limit (squaredcos_cap_v2, trained_betas).
    """

    def __init__(self, alphas_cumprod: np.ndarray):
        from scipy.interpolate import PchipInterpolator

        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        super().__init__(len(alphas_cumprod))
        if not (np.all(alphas_cumprod > 0) and np.all(np.diff(alphas_cumprod) < 0)):
            raise ValueError("alphas_cumprod must be positive and strictly decreasing")
        knots = np.concatenate([[0.0], np.arange(1, self.N + 1) / self.N])
        values = np.concatenate([[0.0], np.log(alphas_cumprod)])
        spline = PchipInterpolator(knots, values)
        self._x = torch.from_numpy(spline.x)  # [n + 1] breakpoints
        self._c = torch.from_numpy(spline.c)  # [4, n] cubic coefficients, highest power first
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # the tables, copied once a device

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The breakpoints and coefficients on t's device: indexing host tables with a device's
        index reads the index back to the host (on a GPU, a synchronisation every call)."""
        if device not in self._on:  # on the host, .to returns the tables themselves
            self._on[device] = (self._x.to(device), self._c.to(device))
        return self._on[device]

    def _piece(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The offset into t's interval, t beyond [0, 1], and the interval's coefficients."""
        t = torch.as_tensor(t, dtype=torch.float64)
        x, c = self._tables(t.device)
        inside = t.clamp(0.0, 1.0)
        i = torch.searchsorted(x, inside.detach(), right=True) - 1
        i = i.clamp(0, c.shape[1] - 1)
        # take and index_select, not x[i]: a 0-dim index tensor is read back as a Python int
        return inside - x.take(i), t - inside, c.index_select(1, i.reshape(-1)).view(4, *i.shape)

    def log_abar(self, t):
        """The spline on [0, 1]; outside it, continued linearly (constant beta)."""
        h, beyond, c = self._piece(t)
        inside = ((c[0] * h + c[1]) * h + c[2]) * h + c[3]
        return inside - self._beta(c, h) * beyond

    @staticmethod
    def _beta(c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return -((3 * c[0] * h + 2 * c[1]) * h + c[2])

    def beta(self, t):
        h, _, c = self._piece(t)
        return self._beta(c, h)


class VESchedule:
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t; f = -1/2 d[sigma^2]/dt score."""

    kind = "ve"

    def __init__(self, sigma_min: float, sigma_max: float):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)  # noise level at t = 0
        self.sigma_max = float(sigma_max)  # noise level at t = 1 (prior std)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t):
        return self.sigma_min * torch.exp(torch.as_tensor(t, dtype=torch.float64) * self._log_ratio)

    sigma_bar = sigma  # alpha = 1

    def log_alpha(self, t):
        return torch.zeros_like(_f64(t))

    def t_of_sigma_bar(self, sigma_bar):
        return torch.log(_f64(sigma_bar) / self.sigma_min) / self._log_ratio

    def log_snr(self, t):
        """-2 log sigma (unit-scale data): linear in t."""
        return -2 * torch.log(self.sigma(t))

    def timestep(self, t):
        """VE networks take sigma itself as their timestep argument."""
        return self.sigma(t)

    def drift_coefficients(self, t):
        """f = -sigma sigma' score, sigma' = sigma log(sigma_max / sigma_min)."""
        sigma = self.sigma(t)
        return torch.zeros_like(sigma), -(sigma**2) * self._log_ratio

    def prior_logp(self, z):
        return _standard_normal_logp(z, self.sigma_max)


_VP_CLOSED_FORM = {"linear": LinearVP, "scaled_linear": ScaledLinearVP}


def schedule_from_scheduler(scheduler: Any) -> VPSchedule | VESchedule:
    """The continuous-time schedule of a diffusers scheduler (DESIGN.md time convention).

    Discrete-time schedulers need `alphas_cumprod`; ScoreSdeVeScheduler gives VE.
    """
    config = scheduler.config
    if type(scheduler).__name__ == "ScoreSdeVeScheduler":
        return VESchedule(config.sigma_min, config.sigma_max)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"scheduler {type(scheduler).__name__} has no alphas_cumprod: memclean supports "
            "discrete-time schedulers (DDPM, DDIM, PNDM, ...) and ScoreSdeVeScheduler"
        )
    schedule_name = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and schedule_name in _VP_CLOSED_FORM:
        return _VP_CLOSED_FORM[schedule_name](
            config.num_train_timesteps, config.beta_start, config.beta_end
        )
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).numpy()
    return InterpolatedVP(alphas_cumprod)
