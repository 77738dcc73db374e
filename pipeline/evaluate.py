"""Evidence that the score finds memorized images: separation statistics, baselines, and
memorized generations (Carlini et al.'s 1/3 nearest-neighbour ratio in L2)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / n1 n2)."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """Share of positives above the (1 - fpr) quantile of the negatives."""
    return float(np.mean(np.asarray(pos) > np.quantile(np.asarray(neg), 1 - fpr)))


def separation(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """Higher-is-positive separation: means, Welch t-test (one-sided) p-value, AUC, TPR@1%FPR."""
    from scipy.stats import ttest_ind

    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    t = ttest_ind(pos, neg, equal_var=False, alternative="greater")
    return {"mean_pos": float(pos.mean()), "mean_neg": float(neg.mean()), "n_pos": len(pos), "n_neg": len(neg),
            "welch_t": float(t.statistic), "welch_p": float(t.pvalue), "auc": roc_auc(pos, neg),
            "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01)}


@torch.no_grad()
def denoising_loss(unet, scheduler, x: torch.Tensor, timestep: int = 100, repeats: int = 8,
                   seed: int = 0) -> np.ndarray:
    """Loss-based membership baseline: mean ||eps - eps_theta(x_k, k)||^2 at a fixed step k,
    over `repeats` seeded noises: x [B, C, H, W] -> [B] (lower = more likely a member)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.full((x.shape[0],), timestep, dtype=torch.long)
    losses = []
    for _ in range(repeats):
        eps = torch.randn(x.shape, generator=g)
        pred = unet(scheduler.add_noise(x, eps, k), k).sample
        losses.append(((pred - eps) ** 2).flatten(1).mean(1))
    return torch.stack(losses).mean(0).numpy()


def nearest(query: np.ndarray, train: np.ndarray, exclude_self: bool = False,
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2 distances to the nearest and second-nearest training images, and the nearest's index.
    query [Q, D], train [N, D]; with exclude_self, query i is train i and is skipped."""
    q2 = (query**2).sum(1)[:, None]
    t2 = (train**2).sum(1)[None, :]
    d1, d2, idx = [], [], []
    for s in range(0, len(query), chunk):
        d = np.maximum(q2[s:s + chunk] + t2 - 2 * query[s:s + chunk] @ train.T, 0)
        if exclude_self:
            d[np.arange(len(d)), np.arange(s, s + len(d))] = np.inf
        order = np.argsort(d, axis=1)[:, :2]
        rows = np.arange(len(d))
        d1.append(np.sqrt(d[rows, order[:, 0]]))
        d2.append(np.sqrt(d[rows, order[:, 1]]))
        idx.append(order[:, 0])
    return np.concatenate(d1), np.concatenate(d2), np.concatenate(idx)


def memorized(samples: np.ndarray, train: np.ndarray, ratio: float = 1 / 3) -> dict[str, Any]:
    """Generations whose nearest training image is closer than `ratio` x the second-nearest."""
    d1, d2, idx = nearest(samples, train)
    hit = d1 < ratio * d2
    return {"count": int(hit.sum()), "n": len(samples), "copied_train_rows": sorted(set(idx[hit].tolist())),
            "mask": hit, "nearest": idx}


@torch.no_grad()
def generate(unet, scheduler_config: dict, n: int, steps: int = 50, seed: int = 0,
             batch: int = 500) -> torch.Tensor:
    """n samples with DDIM (eta 0, `steps` steps) from the model: [n, C, H, W] in [-1, 1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    out = []
    for s in range(0, n, batch):
        x = torch.randn((min(batch, n - s), unet.config.in_channels, size, size), generator=g)
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)
