"""A loaded model made ready for a run on its device: the batch size resolved, the network
compiled at that batch, and compiled once, before the first image, so that the compile time is
a stage of its own rather than hidden in the first shard's.

    batch: --batch-size, or CPU_BATCH on the CPU; on CUDA the largest power of two that the
           device's free memory holds, from the memory one scoring batch of 2 and of 4 images
           takes (peak above the start: fixed + b * per_image), at most `cap` (the shard size:
           a shard is then whole batches, none padded but the source's last)
    precision: --precision unset is bf16 on CUDA and fp32 on the CPU (resolved_scorer)
    compile: --compile auto is on for CUDA and off on the CPU (benchmarks/gpu.py measured it:
           RESULTS.md); on, the network runs through torch.compile on exactly `batch` images at
           a time (DiffusersScore.compile), and one warm-up batch of seeded noise images compiles
           the graphs a run needs (with gradients for V, without for the loss)
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from pipeline.score.models import CPU_BATCH, LoadedModel, ModelSettings
from pipeline.score.scoring import fresh_scores
from pipeline.score.volume import ScorerSettings, precision_for

log = logging.getLogger(__name__)

MAX_BATCH = 512  # the auto batch's ceiling where nothing else bounds it
HEADROOM = 0.7  # the share of free device memory the auto batch may plan to use (the compiled
# graphs' own buffers, the allocator's fragmentation and the embedder take the rest)


def use_compile(settings: ModelSettings) -> bool:
    """--compile resolved: auto is on for CUDA devices only."""
    if settings.compile == "auto":
        return torch.device(settings.device).type == "cuda"
    return settings.compile == "on"


def noise_images(model: LoadedModel, n: int, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """n seeded uniform-noise images in the model's data range: [n, C, H, W] on `device`."""
    lo, hi = model.data_range
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(n, model.channels, *model.sample_size, generator=g)).to(device)


def power_of_two_batch(per_image: float, fixed: float, free: float, cap: int) -> int:
    """The largest power of two b <= cap with fixed + b per_image <= HEADROOM free (bytes), at least 1."""
    fits = int((HEADROOM * free - fixed) // max(per_image, 1.0))
    b = 1
    while 2 * b <= min(fits, cap):
        b *= 2
    return b


def measured_batch(model: LoadedModel, scorer: ScorerSettings, device: torch.device, cap: int) -> int:
    """The auto batch on a CUDA device: peak memory of one scoring batch of 2 and of 4 images
    (eager), fitted as fixed + b * per_image, against the device's free memory."""
    peaks, compiled = [], model.score_fn.compiled
    model.score_fn.compiled = None  # eager: a compiled network pads every batch to its own
    try:
        for b in (2, 4):
            x = noise_images(model, b, device)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            fresh_scores(model, x, scorer)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - start)
    finally:
        model.score_fn.compiled = compiled
    per_image = (peaks[1] - peaks[0]) / 2
    free, _ = torch.cuda.mem_get_info(device)
    batch = power_of_two_batch(per_image, peaks[0] - 2 * per_image, free, cap)
    log.info("auto batch on %s: %d (%.1f MB an image, %.0f MB fixed, %.1f GB free)", device, batch,
             per_image / 2**20, (peaks[0] - 2 * per_image) / 2**20, free / 2**30)
    return batch


def warm_up_settings(scorer: ScorerSettings) -> ScorerSettings:
    """The cheapest solve that calls the network as `scorer`'s does: one Euler step (an adaptive
    solver's probes held fixed) and one loss noise, in the same precision and divergence."""
    return replace(scorer, solver="euler", steps=1, loss_noises=min(scorer.loss_noises, 1),
                   probe_mode="fixed" if scorer.adaptive else scorer.probe_mode)


def resolved_scorer(scorer: ScorerSettings, settings: ModelSettings) -> ScorerSettings:
    """The scorer with --precision resolved for the device (volume.precision_for): what rows and
    cache keys record."""
    return replace(scorer, precision=precision_for(scorer.precision, settings.device))


def ready(model: LoadedModel, settings: ModelSettings, scorer: ScorerSettings, cap: int = MAX_BATCH) -> ModelSettings:
    """Make `model` ready to score with `scorer`: settings with the batch size resolved (see the
    module docstring), and the network compiled at that batch when --compile says so, its
    graphs built by one warm-up batch. Calling it again with the same batch does nothing."""
    device = torch.device(settings.device)
    batch = settings.batch_size
    if batch is None:
        batch = measured_batch(model, scorer, device, cap) if device.type == "cuda" else min(CPU_BATCH, cap)
    built_for = (batch, precision_for(scorer.precision, device))
    if use_compile(settings) and model.warmed != built_for:
        model.score_fn.compile(batch)
        # the graphs are built now: V's (forward with gradients and its backward) and the loss's
        fresh_scores(model, noise_images(model, batch, device), warm_up_settings(scorer))
        model.warmed = built_for
    return replace(settings, batch_size=batch)
