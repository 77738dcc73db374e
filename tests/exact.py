"""Score functions with closed-form answers, and tiny smooth UNets, shared by the tests."""
from __future__ import annotations

import math

import torch

from pipeline.score.models import bits_offset
from pipeline.score.schedules import VESchedule, VPSchedule


class PixelData:
    """What a score function says of its data: 8-bit images in data_range ([-1, 1] unless set)."""

    data_range = (-1.0, 1.0)

    @property
    def bits_offset(self) -> float:
        return bits_offset(self.data_range)


class GaussianScore(PixelData):
    """The exact score of data x_0 ~ N(mu, diag(s^2)) diffused by a VP or VE schedule.

    VP: x_t ~ N(sqrt(abar) mu, abar s^2 + sigma^2);  VE: x_t ~ N(mu, s^2 + sigma^2).
    """

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, schedule: VPSchedule | VESchedule):
        self.mu, self.s, self.schedule = mu.double(), s.double(), schedule

    def mean_var(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.schedule.kind == "vp":
            abar = self.schedule.abar(t)
            return abar.sqrt() * self.mu, abar * self.s**2 + (1 - abar)
        return self.mu, self.s**2 + self.schedule.sigma(t) ** 2

    def score(self, x, t):
        m, v = self.mean_var(t)
        return -(x - m.to(x)) / v.to(x)

    def log_volume_growth(self, eps: float) -> float:
        """V = 1/2 sum_d log(var_d(1) / var_d(eps)), the same for every x."""
        return 0.5 * float(torch.log(self.mean_var(1.0)[1] / self.mean_var(eps)[1]).sum())

    def logp(self, x, eps: float) -> torch.Tensor:
        """log N(x; mean(eps), var(eps)) per sample: [B, ...] -> [B]."""
        m, v = self.mean_var(eps)
        z = (x.double() - m) ** 2 / v + torch.log(2 * math.pi * v)
        return -0.5 * z.flatten(1).sum(1)

    def latent(self, x, eps: float) -> torch.Tensor:
        """x_1: the standardised coordinate (x - mean) / std is constant along the flow."""
        m0, v0 = self.mean_var(eps)
        m1, v1 = self.mean_var(1.0)
        return m1 + (v1 / v0).sqrt() * (x.double() - m0)


class FullGaussianScore(PixelData):
    """The exact score of data x_0 ~ N(mu, S) (full covariance, flattened to D dims):
    x_t ~ N(alpha mu, alpha^2 S + sigma^2 I) =: N(alpha mu, S_t), score = -S_t^-1 (x - alpha mu)."""

    def __init__(self, mu: torch.Tensor, S: torch.Tensor, schedule):
        self.mu, self.S, self.schedule = mu.double(), S.double(), schedule

    @classmethod
    def random(cls, dim: int, schedule, seed: int = 0) -> "FullGaussianScore":
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        return cls(torch.randn(dim, generator=g, dtype=torch.float64) * 0.5,
                   A @ A.T / dim * 0.3 + 0.01 * torch.eye(dim, dtype=torch.float64), schedule)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, len(self.mu), generator=g, dtype=torch.float64)
        return self.mu + z @ torch.linalg.cholesky(self.S).T

    def _alpha_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.exp(self.schedule.log_alpha(t)), self.schedule.sigma(t)

    def cov(self, t) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t)
        return alpha**2 * self.S + sigma**2 * torch.eye(len(self.mu), dtype=torch.float64)

    def score(self, x, t):
        alpha, _ = self._alpha_sigma(t)
        flat = x.double().flatten(1) - alpha * self.mu
        return -torch.linalg.solve(self.cov(t), flat.T).T.reshape(x.shape).to(x.dtype)

    def rate_jacobian(self, t) -> torch.Tensor:
        """d/dxbar of g(xbar) = -sigma score(alpha xbar, t) = sigma S_t^-1 (alpha xbar - alpha mu):
        sigma alpha S_t^-1, [D, D] (the chain rule gives one alpha)."""
        alpha, sigma = self._alpha_sigma(t)
        return sigma * alpha * torch.linalg.inv(self.cov(t))


class ZeroScore(PixelData):
    """score = 0 everywhere (a network that predicts eps = 0)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def score(self, x, t):
        return torch.zeros_like(x)


def tiny_unet(channels: int = 1, size: int = 8, seed: int = 0, scale: float = 0.1):
    """A small random UNet2DModel whose time embedding and output layer are scaled down, so
    that it behaves like a smooth trained denoiser and keeps the ODE non-stiff."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    with torch.no_grad():
        for p in unet.time_embedding.parameters():
            p.mul_(scale)
        for p in unet.conv_out.parameters():
            p.mul_(scale)
    return unet.eval().requires_grad_(False)


def tiny_autoencoder(kind: str = "vq", seed: int = 0, channels: int = 3):
    """A small random VQModel or AutoencoderKL (latent 2x smaller than the image)."""
    from diffusers import AutoencoderKL, VQModel

    torch.manual_seed(seed)
    common = dict(in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(8, 16),
                  norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)
    if kind == "vq":
        return VQModel(latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, **common).eval()
    return AutoencoderKL(latent_channels=4, scaling_factor=0.18215, **common).eval()


def save_latent_pipeline(path, kind: str = "vq", unet=None, scheduler=None, seed: int = 0):
    """A latent pipeline saved with diffusers' own save_pretrained: LDMPipeline (vqvae/, unet/,
    scheduler/) for a VQModel; for an AutoencoderKL its components under vae/, unet/, scheduler/
    with a model_index.json naming them."""
    import json

    from diffusers import DDPMScheduler, LDMPipeline

    ae = tiny_autoencoder(kind, seed)
    unet = unet if unet is not None else tiny_unet(channels=ae.config.latent_channels, size=8, seed=seed)
    scheduler = scheduler if scheduler is not None else DDPMScheduler()
    if kind == "vq":
        LDMPipeline(vqvae=ae, unet=unet, scheduler=scheduler).save_pretrained(path)
        return path
    for name, part in (("vae", ae), ("unet", unet), ("scheduler", scheduler)):
        part.save_pretrained(path / name)
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return path
