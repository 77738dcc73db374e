"""Load a local diffusers checkpoint and wrap it as a score function s(x, t) = grad log p_t(x).

Two layouts are accepted:
    flat:     config.json, diffusion_pytorch_model.safetensors, scheduler_config.json
              (as the google/ddpm-* repositories ship)
    pipeline: model_index.json, unet/, scheduler/ (DiffusionPipeline.save_pretrained)
Only safetensors weights load unless `allow_pickle` is set.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .schedules import VESchedule, VPSchedule, schedule_from_scheduler

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, broken or not allowed."""


class ScoreFunction(Protocol):
    """A time-dependent score model with its noise schedule."""

    schedule: VPSchedule | VESchedule

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W], t: [] float64 in [eps, 1] -> [B, C, H, W] estimate of grad log p_t."""


@dataclass(frozen=True)
class ModelPaths:
    """Where the parts of a checkpoint live."""

    root: Path  # the folder the user named
    unet: Path  # folder with config.json and the weights
    scheduler_config: Path  # scheduler_config.json
    weights: Path  # the weights file that will be loaded


def resolve_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> ModelPaths:
    """Find the UNet folder, weights and scheduler config in either layout, or say what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"model path {str(root)!r} is not a folder: expected a diffusers "
                              "checkpoint (config.json + weights + scheduler_config.json, "
                              "or model_index.json with unet/ and scheduler/)")
    if (root / "model_index.json").is_file():
        unet, sched = root / "unet", root / "scheduler" / "scheduler_config.json"
    else:
        unet, sched = root, root / "scheduler_config.json"
    if not (unet / "config.json").is_file():
        raise CheckpointError(f"{str(unet / 'config.json')!r} not found: expected a diffusers "
                              "UNet config in the flat layout or under unet/")
    if not sched.is_file():
        raise CheckpointError(f"{str(sched)!r} not found: the noise schedule is needed to score")
    weights = unet / SAFE_WEIGHTS
    if not weights.is_file():
        pickle_file = unet / PICKLE_WEIGHTS
        if not pickle_file.is_file():
            raise CheckpointError(f"no weights in {str(unet)!r}: expected {SAFE_WEIGHTS}")
        if not allow_pickle:
            raise CheckpointError(f"{str(pickle_file)!r} is a pickle file, which can run code when "
                                  f"loaded; convert it to {SAFE_WEIGHTS} or pass --allow-pickle")
        weights = pickle_file
    return ModelPaths(root, unet, sched, weights)


def fingerprint(paths: ModelPaths) -> str:
    """sha256 over the weights bytes, the UNet config and the scheduler config (canonical JSON)."""
    h = hashlib.sha256()
    with open(paths.weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for cfg in (paths.unet / "config.json", paths.scheduler_config):
        h.update(json.dumps(_read_json(cfg), sort_keys=True).encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(path)!r} as JSON: {e}") from e


def load_scheduler(path: Path) -> Any:
    """The diffusers scheduler named by `_class_name` in a scheduler_config.json."""
    import diffusers

    config = _read_json(path)
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise CheckpointError(f"{str(path)!r}: unknown scheduler class {name!r}")
    return cls.from_config(config)


def load_unet(paths: ModelPaths) -> torch.nn.Module:
    """The UNet named by `_class_name` in config.json, from the resolved weights file."""
    import diffusers

    config = _read_json(paths.unet / "config.json")
    name = config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CheckpointError(f"{str(paths.unet)!r}: unknown model class {name!r}")
    try:
        model = cls.from_pretrained(paths.unet, use_safetensors=paths.weights.name == SAFE_WEIGHTS,
                                    local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises many types for a broken file
        raise CheckpointError(f"cannot load {str(paths.weights)!r} as {name}: {e}") from e
    return model.eval().requires_grad_(False)


class DiffusersScore(torch.nn.Module):
    """A diffusers UNet as a score function, under the DESIGN.md time convention.

    VP: eps_hat = unet(x, t (N-1)) (v_prediction and sample converted), score = -eps_hat / sigma.
    VE: the UNet takes sigma(t) and returns the score itself (ScoreSdeVe / NCSN++ convention).
    """

    def __init__(self, unet: torch.nn.Module, schedule: VPSchedule | VESchedule,
                 prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        if getattr(getattr(unet, "config", None), "time_embedding_type", None) == "learned":
            raise ValueError("time_embedding_type 'learned' takes integer timesteps only; "
                             "the continuous-time ODE needs a sinusoidal or Fourier embedding")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type  # what the network outputs

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        timestep = self.schedule.timestep(t).to(self.dtype).expand(x.shape[0]).to(x.device)
        out = self.unet(x.to(self.dtype), timestep).sample.to(x.dtype)
        sigma = self.schedule.sigma(t).to(x.dtype)
        if isinstance(self.schedule, VESchedule):
            return out
        if self.prediction_type == "epsilon":
            eps_hat = out
        elif self.prediction_type == "v_prediction":  # v = sqrt(abar) eps - sigma x_0
            eps_hat = self.schedule.abar(t).sqrt().to(x.dtype) * out + sigma * x
        else:  # sample: x_0 prediction, x = sqrt(abar) x_0 + sigma eps
            eps_hat = (x - self.schedule.abar(t).sqrt().to(x.dtype) * out) / sigma
        return -eps_hat / sigma


@dataclass
class LoadedModel:
    """A checkpoint ready to score with."""

    score_fn: DiffusersScore  # s(x, t) with its schedule
    fingerprint: str  # sha256 of weights and configs
    channels: int  # the network's input channels
    sample_size: tuple[int, int]  # (H, W) the network was trained on
    paths: ModelPaths
    scheduler_class: str  # e.g. DDPMScheduler


def load_model(path: str | os.PathLike, allow_pickle: bool = False,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a local checkpoint (either layout) as a score function on `device`."""
    paths = resolve_checkpoint(path, allow_pickle)
    scheduler = load_scheduler(paths.scheduler_config)
    schedule = schedule_from_scheduler(scheduler)
    unet = load_unet(paths).to(device)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    score_fn = DiffusersScore(unet, schedule, prediction_type)
    size = unet.config.sample_size
    sample_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    log.info("loaded %s (%s, %s) from %s", type(unet).__name__, type(scheduler).__name__,
             prediction_type, paths.root)
    return LoadedModel(score_fn, fingerprint(paths), int(unet.config.in_channels), sample_size,
                       paths, type(scheduler).__name__)
