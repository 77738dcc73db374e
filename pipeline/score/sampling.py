"""Generations of a checkpoint: DDIM samples (eta 0) with its own scheduler's noise schedule,
seeded by block and cached, so that a killed run resumes without sampling again.

The starting noise of generation i is row i mod BLOCK of the (i // BLOCK)-th draw of
torch.randn((BLOCK, C, H, W)) from torch.Generator().manual_seed(seed): the same generations
whatever --generations, --batch-size or the device (the noise is drawn on the CPU), and the
same as pipeline/tools/evaluate.generate's (the benchmarks' count). DDIM with eta 0 is
deterministic given the noise (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12):
    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps_hat,
    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t),
each generation independent of the others in its batch. Latent pipelines sample the latent and
decode it through their autoencoder (z / scaling_factor). Generations are returned in the
model's data range, clamped to it, as the images it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.fields import check_choices, setting
from pipeline.score.models import LoadedModel, load_scheduler
from pipeline.score.volume import PRECISIONS, network_precision, precision_for

log = logging.getLogger(__name__)

BLOCK = 500  # generations per noise draw and per cache file
SAMPLE_BATCH = {"cpu": 128, "cuda": 256}  # default generations through the network at once (forward only)


@dataclass(frozen=True)
class SampleSettings:
    """How generations are sampled."""

    generations: int = setting(1000, "generations to sample from the model")
    sample_steps: int = setting(50, "DDIM steps per generation: the network runs this many times for each",
                                aliases=("steps",))
    sample_seed: int = setting(0, f"seed of the generations' starting noise (drawn {BLOCK} at a time: the same "
                               "generations whatever --generations, --batch-size or the device)")
    precision: str | None = setting(None, "the network's arithmetic while sampling: fp32, tf32 (CUDA matmuls and "
                                    "convolutions) or bf16 (autocast); default: bf16 on CUDA, fp32 on the CPU, as "
                                    "scoring (--compile auto compiles on CUDA too)", choices=PRECISIONS)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.generations < 1:
            raise ValueError(f"--generations must be at least 1, got {self.generations}")
        if not 1 <= self.sample_steps <= 1000:
            raise ValueError(f"--sample-steps must be in [1, 1000], got {self.sample_steps}")


def sampling_key(fingerprint: str, settings: SampleSettings, precision: str = "fp32") -> str:
    """The hash of everything but the count that determines the generations (the precision
    resolved: precision_for)."""
    blob = json.dumps({"model": fingerprint, "sampler": "ddim", "eta": 0.0, "steps": settings.sample_steps,
                       "seed": settings.sample_seed, "block": BLOCK, "precision": precision}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def ddim_scheduler(scheduler_config: dict, steps: int):
    """The checkpoint's scheduler as DDIM (its betas, offset and clipping), with `steps` steps.
    VE schedulers (ScoreSdeVe) have no DDIM form: a clear error."""
    from diffusers import DDIMScheduler

    if "sigma_max" in scheduler_config or "beta_start" not in scheduler_config and "trained_betas" not in scheduler_config:
        raise ValueError(f"memclean verify samples with DDIM, which needs a VP (DDPM-style) scheduler; this model's "
                         f"is {scheduler_config.get('_class_name')!r}")
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    return sched


def noise_blocks(shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """The starting noise of successive blocks of BLOCK generations: [BLOCK, *shape] each."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn((BLOCK, *shape), generator=g)


@torch.no_grad()
def ddim_sample(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sched, noise: torch.Tensor, batch: int,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """DDIM (eta 0) from `noise` [N, C, H, W], `batch` at a time, `net(x, t)` the network's output
    for x (in `dtype`) at the timesteps t [N]: [N, C, H, W] on the CPU."""
    out = []
    for s in range(0, len(noise), batch):
        x = noise[s:s + batch].to(device)
        for t in sched.timesteps:
            timestep = t.to(device, torch.float32).expand(len(x))  # float, as scoring calls the network
            eps = net(x.to(dtype), timestep).to(x.dtype)[:, :x.shape[1]]  # a variance-predicting UNet: eps first
            x = sched.step(eps, t, x).prev_sample
        out.append(x.float().cpu())
        if progress:
            progress(len(x))
    return torch.cat(out)


@torch.no_grad()
def to_images(model: LoadedModel, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Samples -> images in the model's data range: decoded through the autoencoder for latent
    pipelines (from [-1, 1]), clamped to the range."""
    if model.encoder is not None:
        ae = model.encoder.autoencoder
        dev, dtype = next(ae.parameters()).device, next(ae.parameters()).dtype
        parts = [ae.decode((x[s:s + batch] / model.encoder.scaling_factor).to(dev, dtype)).sample.float().cpu()
                 for s in range(0, len(x), batch)]
        x = torch.cat(parts)
    x = x.clamp(-1, 1)
    lo, hi = model.data_range
    return lo + (x + 1) / 2 * (hi - lo)


def generate(model: LoadedModel, settings: SampleSettings, batch: int | None = None, cache_dir: str | None = None,
             progress: Callable[[int], None] | None = None, out: Path | None = None,
             compile_network: bool = False) -> tuple[np.ndarray, dict]:
    """settings.generations images from the model [N, C, H, W] float32 in its data range, and a
    record (key, cached and fresh counts, seconds). Each block's generations are cached under
    cache_dir/generations/KEY/ (a block is written whole when done: a killed run resumes). With
    `out`, the images go to that file, a block at a time, and come back memory-mapped from it:
    memory holds one block, whatever the count. The network runs in settings.precision (resolved
    for its device) and, with compile_network, through torch.compile at `batch` images a call."""
    import time

    t0 = time.perf_counter()
    unet = model.score_fn.unet
    device = next(unet.parameters()).device
    batch = batch or SAMPLE_BATCH["cuda" if device.type == "cuda" else "cpu"]
    sched = ddim_scheduler(dict(load_scheduler(model.checkpoint).config), settings.sample_steps)
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, (list, tuple)) else (c.sample_size,) * 2
    shape = (int(c.in_channels), int(size[0]), int(size[1]))
    precision = precision_for(settings.precision, device)
    if compile_network:
        model.score_fn.compile(batch)  # compiled on its first batch (padded to `batch` images, as scoring's)
    key = sampling_key(model.fingerprint, settings, precision)
    dtype = model.score_fn.dtype

    def sample(noise: torch.Tensor) -> torch.Tensor:
        with network_precision(precision, device):
            return ddim_sample(model.score_fn.network, sched, noise, batch, device, dtype, progress)

    folder = Path(cache_dir) / "generations" / key if cache_dir else None
    n, parts, cached = settings.generations, [], 0
    for block, noise in zip(range(-(-n // BLOCK)), noise_blocks(shape, settings.sample_seed)):
        want = min(BLOCK, n - block * BLOCK)
        have = _read_block(folder, block)
        start = 0 if have is None else min(len(have), want)
        if start < want:
            fresh = to_images(model, sample(noise[start:want]), batch)
            have = fresh.numpy() if have is None else np.concatenate([have, fresh.numpy()])
            _write_block(folder, block, have)
        elif progress:
            progress(want)
        if out is not None:
            if not parts:
                parts.append(np.lib.format.open_memmap(out, "w+", np.float32, (n, *have.shape[1:])))
            parts[0][block * BLOCK:block * BLOCK + want] = have[:want]
        else:
            parts.append(have[:want])
        cached += start
    if out is not None:
        parts[0].flush()
        images = np.load(out, mmap_mode="r")
    else:
        images = np.concatenate(parts).astype(np.float32, copy=False)
    return images, {"key": key, "cache": str(folder) if folder else None, "cached": cached, "fresh": n - cached,
                    "seconds": round(time.perf_counter() - t0, 3), "batch_size": batch, "precision": precision,
                    "compiled": model.score_fn.compiled is not None,
                    "network_passes": (n - cached) * settings.sample_steps}


def _read_block(folder: Path | None, block: int) -> np.ndarray | None:
    if folder is None or not (folder / f"block-{block:06d}.npy").is_file():
        return None
    try:
        return np.load(folder / f"block-{block:06d}.npy")
    except (OSError, ValueError) as e:  # a damaged file is sampled again, not trusted
        log.warning("generation cache %s block %d unreadable (%s): sampled again", folder, block, e)
        return None


def _write_block(folder: Path | None, block: int, images: np.ndarray) -> None:
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".block-{block:06d}.{os.getpid()}.npy"
    np.save(tmp, images)
    os.replace(tmp, folder / f"block-{block:06d}.npy")
