"""Evidence that the score finds memorized images: separation statistics, baselines, and
memorized generations (Carlini et al.'s 1/3 nearest-neighbour ratio in L2)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


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
    """Loss-based membership baseline: mean ||eps - eps_hat(x_k, k)||^2 at a fixed step k over
    `repeats` noises: x [B, C, H, W] -> [B] (lower = more likely a member).

    eps_hat is the network's output turned into a noise prediction whatever it predicts
    (v_prediction: eps = sqrt(abar) v + sqrt(1 - abar) x_k; sample: eps = (x_k - sqrt(abar) x_0) /
    sqrt(1 - abar)). The noises are a hash of (seed, image content) (`ProbeStream`), so an image's
    loss does not depend on its batch or device.
    """
    from pipeline.score.probes import ProbeStream

    abar = scheduler.alphas_cumprod[timestep].to(torch.float64)
    a, s = float(abar.sqrt()), float((1 - abar).sqrt())
    prediction = scheduler.config.get("prediction_type", "epsilon")
    k = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
    noises = ProbeStream(x, seed, repeats, "gaussian", fresh=False)(0).to(x.dtype)  # [R, B, ...]
    dtype = next(unet.parameters()).dtype
    losses = []
    for eps in noises:
        x_k = a * x + s * eps
        out = unet(x_k.to(dtype), k).sample.to(x.dtype)[:, :x.shape[1]]
        eps_hat = {"epsilon": out, "v_prediction": a * out + s * x_k, "sample": (x_k - a * out) / s}[prediction]
        losses.append(((eps_hat - eps) ** 2).flatten(1).mean(1))
    return torch.stack(losses).mean(0).cpu().numpy()


def nearest(query: np.ndarray, train: np.ndarray, exclude_self: bool = False,
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2 distances to the nearest and second-nearest training images (inf where there is none),
    and the nearest's index. query [Q, D], train [N, D]; with exclude_self, query i is train i and
    is skipped."""
    q2 = (query**2).sum(1)[:, None]
    t2 = (train**2).sum(1)[None, :]
    d1, d2, idx = [], [], []
    for s in range(0, len(query), chunk):
        d = np.maximum(q2[s:s + chunk] + t2 - 2 * query[s:s + chunk] @ train.T, 0)
        if exclude_self:
            d[np.arange(len(d)), np.arange(s, s + len(d))] = np.inf
        d = np.concatenate([d, np.full((len(d), 1), np.inf)], 1)  # a sentinel: a 1-image set has no second
        order = np.argsort(d, axis=1)[:, :2]
        rows = np.arange(len(d))
        d1.append(np.sqrt(d[rows, order[:, 0]]))
        d2.append(np.sqrt(d[rows, order[:, 1]]))
        idx.append(order[:, 0])
    return np.concatenate(d1), np.concatenate(d2), np.concatenate(idx)


def memorized(samples: np.ndarray, train: np.ndarray, ratio: float = 1 / 3,
              groups: np.ndarray | None = None, chunk: int = 1024) -> dict[str, Any]:
    """Generations whose nearest training image is closer than `ratio` x the second-nearest
    *distinct* training image (Carlini et al. 2023; Gu et al. 2023). Copies of one image are
    one image: rows sharing a `groups` label (default: identical pixels) count once, so a
    generation that copies a duplicated image is not excused by the duplicate beside it.
    Returns count, n, the copied training rows (every member of each copied group), a mask
    over samples and each sample's nearest training row."""
    samples, train = np.asarray(samples, np.float64), np.asarray(train, np.float64)
    if groups is None:
        groups = np.unique(train, axis=0, return_inverse=True)[1].reshape(-1)
    groups = np.asarray(groups)
    labels, gid = np.unique(groups, return_inverse=True)
    gid = gid.reshape(-1)
    order = np.argsort(gid, kind="stable")
    starts = np.searchsorted(gid[order], np.arange(len(labels)))
    ordered = train[order]  # grouped rows, built once
    t2 = (ordered**2).sum(1)[None, :]
    hit, nearest_row = [], []
    for s in range(0, len(samples), chunk):
        q = samples[s:s + chunk]
        d = np.maximum((q**2).sum(1)[:, None] + t2 - 2 * q @ ordered.T, 0)
        per_group = np.minimum.reduceat(d, starts, axis=1)  # [Q, groups]: distance to each distinct image
        two = np.sort(np.partition(per_group, min(1, per_group.shape[1] - 1), axis=1)[:, :2], axis=1)
        second = two[:, 1] if per_group.shape[1] > 1 else np.full(len(q), np.inf)
        hit.append(np.sqrt(two[:, 0]) < ratio * np.sqrt(second))
        nearest_row.append(order[np.argmin(d, axis=1)])
    hit, nearest_row = np.concatenate(hit), np.concatenate(nearest_row)
    copied_groups = np.unique(gid[nearest_row[hit]])
    rows = np.flatnonzero(np.isin(gid, copied_groups))
    return {"count": int(hit.sum()), "n": len(samples), "copied_train_rows": rows.tolist(),
            "copied_images": len(copied_groups), "mask": hit, "nearest": nearest_row}


def generate(unet, scheduler_config: dict, n: int, steps: int = 50, seed: int = 0,
             batch: int = 500) -> torch.Tensor:
    """n samples with DDIM (eta 0, `steps` steps) from the model: [n, C, H, W] in [-1, 1]; the
    same noise and sampler as `memclean verify` (pipeline/score/sampling.py)."""
    from pipeline.score.sampling import BLOCK, ddim_sample, ddim_scheduler, noise_blocks

    sched = ddim_scheduler(scheduler_config, steps)
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    out = []
    for block, noise in zip(range(-(-n // BLOCK)), noise_blocks(shape, seed)):
        out.append(ddim_sample(lambda x, t: unet(x, t).sample, sched, noise[:min(BLOCK, n - block * BLOCK)], batch)
                   .clamp(-1, 1))
    return torch.cat(out)
