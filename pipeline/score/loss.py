"""The denoising loss at one noise level: the standard membership baseline (Carlini et al. 2023;
Matsumoto et al. 2023), computed beside V in the same run.

    L(x) = 1/n sum_j 1/D || eps_hat(alpha(t) x + sigma(t) eps_j, t) - eps_j ||^2,   eps_j ~ N(0, I)

at a fixed time t of the module's time convention (score/schedules.py: the network's timestep is
t (N - 1)), with eps_hat = -sigma(t) score(x_t, t), so every prediction type (epsilon,
v_prediction, sample) and VE models (alpha = 1) give the noise prediction the loss compares.
Lower = better reproduced. The noises are a hash of (seed, the image's content) (ProbeStream,
with keys of their own, apart from V's probes), so an image's loss depends on neither its
batch, its order nor the device. Its standard error is the spread of the n per-noise losses:
sd / sqrt(n).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.score.models import ScoreFunction
from pipeline.score.probes import MASK64, ProbeStream, splitmix64

LOSS_SALT = 0x10552E0D5C0FFEE  # mixed into an image's probe key: the loss's noises are not V's probes


@dataclass
class LossResult:
    """Per-image results, all [B] float64."""

    denoising_loss: torch.Tensor  # L(x): the mean over the noises
    denoising_loss_se: torch.Tensor  # its standard error: sd of the per-noise losses / sqrt(n)


def loss_keys(keys: list[int]) -> list[int]:
    """The loss's noise keys from an image's probe keys (one per image)."""
    return [splitmix64((k ^ LOSS_SALT) & MASK64) for k in keys]


def loss_noises(x: torch.Tensor, noises: int, seed: int = 0, keys: list[int] | None = None) -> torch.Tensor:
    """The loss's seeded noises for a batch: x [B, C, H, W] -> [noises, B, C, H, W] float64 (keys:
    one per image, a latent pipeline's images' keys; by default the hash of (seed, x))."""
    from pipeline.score.probes import image_keys

    keys = image_keys(seed, x) if keys is None else keys
    return ProbeStream(x, seed, noises, "gaussian", fresh=False, keys=loss_keys(keys))(0)


@torch.no_grad()
def per_noise_losses(score_fn: ScoreFunction, x: torch.Tensor, t: float, eps: torch.Tensor) -> torch.Tensor:
    """||eps_hat(alpha x + sigma e, t) - e||^2 / D for each noise e of eps [n, B (or 1), ...]:
    x [B, ...] -> [n, B] float64."""
    tt = torch.tensor(t, dtype=torch.float64)
    alpha = float(torch.exp(score_fn.schedule.log_alpha(tt)))
    sigma = float(score_fn.schedule.sigma(tt))
    # made on the device, not copied there: a copy to a GPU waits for everything queued before it
    t_on = torch.full((), t, dtype=torch.float64, device=x.device)
    per_noise = []
    for e in eps:
        e = e.to(x.dtype)
        eps_hat = -sigma * score_fn.score(alpha * x + sigma * e, t_on)
        per_noise.append(((eps_hat - e).to(torch.float64) ** 2).flatten(1).mean(1))
    return torch.stack(per_noise)


def denoising_loss(score_fn: ScoreFunction, x: torch.Tensor, t: float, noises: int, seed: int = 0,
                   keys: list[int] | None = None) -> LossResult:
    """L(x) and its standard error at time t over `noises` seeded noises: x [B, C, H, W] in the
    model's data range (or its latent) -> LossResult. keys: one per image (a latent pipeline's
    images' keys); by default the hash of (seed, x)."""
    losses = per_noise_losses(score_fn, x, t, loss_noises(x, noises, seed, keys))  # [n, B]
    se = losses.std(0, unbiased=True) / noises**0.5 if noises > 1 else torch.full_like(losses[0], float("nan"))
    return LossResult(losses.mean(0), se)
