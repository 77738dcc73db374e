"""A small DDPM trainer (diffusers UNet2DModel + DDPMScheduler) for the demo and proxy models.

Loss: the epsilon-prediction objective E ||eps - eps_theta(sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps, k)||^2
over uniform discrete steps k (Ho et al., 2020). The checkpoint is written with
save_pretrained (model_index.json, unet/, scheduler/; safetensors) plus training.json.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from pipeline.fields import DEVICE_HELP, check_choices, check_device, setting
from pipeline.io.data import ImageSpec, Item, batched
from pipeline.score.models import usable_device

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class TrainSettings:
    """The whole training recipe: with the data it reproduces a checkpoint."""

    sample_size: int = setting(32, "square image size: images are centre-cropped and resized to it")
    channels: int = setting(1, "image channels: 1 (L) or 3 (RGB)", choices=(1, 3))
    block_out_channels: tuple[int, ...] = setting((32, 64), "UNet width per resolution level")
    layers_per_block: int = setting(1, "ResNet blocks per level")
    num_train_timesteps: int = setting(1000, "N of the DDPM schedule")
    beta_start: float = setting(1e-4, "the first beta of the schedule, as DDPM")
    beta_end: float = setting(0.02, "the last beta")
    beta_schedule: str = setting("linear", "the DDPM noise schedule (diffusers' names)", choices=BETA_SCHEDULES)
    steps: int = setting(2000, "optimiser steps")
    batch_size: int = setting(64, "images per step")
    lr: float = setting(1e-3, "AdamW learning rate (cosine decay to 0)")
    seed: int = setting(0, "seed for initialisation, batches and noise")
    device: str = setting("cpu", f"training: {DEVICE_HELP} (batches and noise are drawn on the CPU from the seed, "
                          "so a device changes only the arithmetic's rounding)")
    init_from: str | None = setting(None, "continue from this memclean-trained checkpoint's UNet weights (its "
                                    "unet/*.safetensors; the architecture settings must match it); the new "
                                    "training.json keeps the earlier one's recipe under init_from")

    def __post_init__(self) -> None:
        for name in ("sample_size", "steps", "batch_size", "num_train_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_choices(self)
        check_device(self.device)
        if self.sample_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"sample_size {self.sample_size} must be divisible by "
                             f"{2 ** (len(self.block_out_channels) - 1)} for {len(self.block_out_channels)} levels")


def build_unet(s: TrainSettings) -> torch.nn.Module:
    from diffusers import UNet2DModel

    levels = len(s.block_out_channels)
    return UNet2DModel(sample_size=s.sample_size, in_channels=s.channels, out_channels=s.channels,
                       block_out_channels=s.block_out_channels, layers_per_block=s.layers_per_block,
                       down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                       norm_num_groups=min(8, s.block_out_channels[0]))


def init_weights(unet: torch.nn.Module, checkpoint: str | os.PathLike) -> dict:
    """Load a memclean-trained checkpoint's UNet weights into `unet` (safetensors only, every
    tensor matched by name and shape) and return the checkpoint's training.json (or {})."""
    from safetensors.torch import load_file

    root = Path(checkpoint)
    weights = sorted((root / "unet").glob("*.safetensors"))
    if len(weights) != 1:
        raise ValueError(f"--init-from {root}: expected one unet/*.safetensors, found {len(weights)}")
    state = load_file(str(weights[0]))
    own = unet.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"--init-from {root}: its UNet does not match these architecture settings "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}, other shapes {sorted(shapes)[:3]})")
    unet.load_state_dict(state)
    recipe = root / "training.json"
    return json.loads(recipe.read_text()) if recipe.exists() else {}


def load_images(items: Iterable[Item], spec: ImageSpec) -> torch.Tensor:
    """All decodable images as one tensor [N, C, H, W] (small training sets only)."""
    kept, skipped = [], 0
    for batch in batched(items, spec, 256):
        kept += [d.pixels for d in batch if d.pixels is not None]
        skipped += sum(d.pixels is None for d in batch)
    if skipped:
        log.warning("skipped %d undecodable training images", skipped)
    if not kept:
        raise ValueError("no decodable training images")
    return torch.stack(kept)


def train(images: torch.Tensor, out: str | os.PathLike, settings: TrainSettings,
          progress: Callable[[int, float], None] | None = None, recipe: dict | None = None) -> Path:
    """Train on images [N, C, H, W] in [-1, 1] and save the checkpoint to `out` atomically."""
    from diffusers import DDPMPipeline, DDPMScheduler

    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    device = usable_device(settings.device)
    unet = build_unet(settings)
    earlier = init_weights(unet, settings.init_from) if settings.init_from else None
    unet = unet.to(device).train()
    images = images.to(device)
    scheduler = DDPMScheduler(num_train_timesteps=settings.num_train_timesteps,
                              beta_start=settings.beta_start, beta_end=settings.beta_end,
                              beta_schedule=settings.beta_schedule, prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    for step in range(settings.steps):
        idx = torch.randint(0, len(images), (settings.batch_size,), generator=g)
        x0 = images[idx.to(device)]
        eps = torch.randn(x0.shape, generator=g).to(device)
        k = torch.randint(0, settings.num_train_timesteps, (len(x0),), generator=g).to(device)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, eps, k), k).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step, float(loss.detach()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    DDPMPipeline(unet=unet.cpu().eval(), scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    record = {"settings": asdict(settings), "images": len(images), **(recipe or {})}
    if earlier is not None:
        record["init_from"] = earlier
        record["total_steps"] = settings.steps + int(earlier.get("total_steps", earlier.get("settings", {}).get("steps", 0)))
    (tmp / "training.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
