"""Load a local diffusers checkpoint through diffusers' own loaders and wrap it as a score
function s(x, t) = grad log p_t(x).

Every layout diffusers loads:
    pipeline: model_index.json, unet/, scheduler/            (DiffusionPipeline.save_pretrained)
    root:     model_index.json with the UNet's config.json, weights and scheduler_config.json
              beside it, no unet/ or scheduler/ folder      (google/ddpm-*: diffusers loads a
              component whose subfolder is missing from the root)
    flat:     config.json, weights, scheduler_config.json   (a UNet and scheduler saved together)
with single or sharded (*.safetensors.index.json) weights and weight variants (`variant`,
diffusion_pytorch_model.fp16.safetensors). Only safetensors load unless `allow_pickle`.
Latent pipelines (a VQModel in vqvae/ or an AutoencoderKL in vae/ beside the UNet, as
LDMPipeline saves them) are scored in the latent their UNet diffuses (`LatentEncoder`).
What memclean cannot score rightly is refused before any weights are read: conditional and
class-conditional UNets, other autoencoders, schedules with zero terminal SNR, unknown
prediction types, and configs with absurd sizes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.fields import DEVICE_HELP, check_choices, check_device, setting
from pipeline.score.hub import HubModel, model_folder
from pipeline.score.schedules import VESchedule, VPSchedule, schedule_from_scheduler

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SCORABLE_UNETS = ("UNet2DModel",)  # unconditional pixel-space UNets
AUTOENCODERS = ("VQModel", "AutoencoderKL")  # latent pipelines memclean scores
AUTOENCODER_NAMES = ("vqvae", "vae")  # the component names pipelines give them
CONDITIONING = ("text_encoder", "tokenizer", "text_encoder_2", "image_encoder", "feature_extractor")
DATA_RANGES = {"signed": (-1.0, 1.0), "unit": (0.0, 1.0)}  # --data-range choices besides auto
FAMILY_RANGE = {"vp": "signed", "ve": "unit"}  # DDPM-style models see [-1, 1]; score_sde's VE (NCSN++) [0, 1]
CPU_BATCH = 16  # the CPU's default --batch-size
COMPILE_CHOICES = ("auto", "on", "off")
LIMITS = {"sample_size": 8192, "in_channels": 64, "out_channels": 128, "layers_per_block": 64, "block_out_channels": 16384}


@dataclass(frozen=True)
class ModelSettings:
    """Which checkpoint scores, how it is loaded, and where it runs."""

    model: str = setting(help="a local diffusers checkpoint folder (any layout diffusers loads: docs/guides/inputs-and-models.md), "
                         "or a Hub id ORG/NAME[@REVISION] already in the local Hugging Face cache (never downloaded)")
    allow_pickle: bool = setting(False, "also load pickle (.bin) weights; they can run code when loaded")
    variant: str | None = setting(None, "diffusers weight variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    data_range: str = setting("auto", "the range the model was trained on: auto (VP/DDPM models [-1, 1], VE/NCSN++ "
                              "[0, 1]), signed [-1, 1] or unit [0, 1]; V, log p and bits/dim are for the image in it",
                              choices=("auto", "signed", "unit"))
    device: str = setting("cpu", f"the model: {DEVICE_HELP}")
    batch_size: int | None = setting(None, "images decoded and solved together (throughput grows with it); default: "
                                     f"{CPU_BATCH} on the CPU, on CUDA the largest power of two that fits the device "
                                     "(measured once per run, at most the shard size; the manifest records it)")
    compile: str = setting("auto", "torch.compile the network (inductor), in batches of exactly --batch-size (the last "
                           "padded) so that a run compiles once: auto (on for CUDA, off on the CPU, where it was "
                           "measured no faster: RESULTS.md), on, off", choices=COMPILE_CHOICES)

    def __post_init__(self) -> None:
        check_choices(self)  # data_range, compile
        check_device(self.device)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, broken, not allowed, or not scorable."""


def bits_offset(data_range: tuple[float, float]) -> float:
    """log2(1 / bin width) of 8-bit data k / 255 mapped to [lo, hi]: [-1, 1] -> log2(127.5) = 6.994."""
    lo, hi = data_range
    return math.log2(255 / (hi - lo))


class ScoreFunction(Protocol):
    """A time-dependent score model with its noise schedule and the data range it models."""

    schedule: VPSchedule | VESchedule
    data_range: tuple[float, float]
    bits_offset: float  # bits/dim = -logp / (D ln 2) + this: bits_offset(data_range), or 0 for a latent

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W], t: [] float64 in [eps, 1] -> [B, C, H, W] estimate of grad log p_t."""


@dataclass(frozen=True)
class Checkpoint:
    """Where the parts of a checkpoint live, as diffusers would find them."""

    root: Path  # the folder the user named
    layout: str  # pipeline | root | flat
    unet_subfolder: str | None  # from_pretrained's subfolder for the UNet (None: the root)
    scheduler_subfolder: str | None
    weights: tuple[Path, ...]  # the weight files that will be loaded (shards included)
    variant: str | None  # diffusers' weight variant (fp16, ...)
    autoencoder: str | None = None  # latent pipelines: the autoencoder's subfolder (vqvae, vae)
    autoencoder_class: str | None = None  # VQModel | AutoencoderKL
    hub: HubModel | None = None  # when --model named a Hub id: its id, revision and cached snapshot

    @property
    def unet_dir(self) -> Path:
        return self.root / (self.unet_subfolder or "")

    @property
    def scheduler_config(self) -> Path:
        return self.root / (self.scheduler_subfolder or "") / "scheduler_config.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(path)!r} as JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} is not a JSON object")
    return data


def _add_variant(name: str, variant: str | None) -> str:
    """diffusers' naming: diffusion_pytorch_model.safetensors -> diffusion_pytorch_model.fp16.safetensors."""
    if variant is None:
        return name
    head, ext = name.rsplit(".", 1)
    return f"{head}.{variant}.{ext}"


def weight_files(folder: Path, variant: str | None, allow_pickle: bool) -> tuple[Path, ...]:
    """The weight files diffusers loads from `folder`: one file, or an index and its shards;
    safetensors first, pickle only with allow_pickle. Errors name what is missing."""
    found: dict[str, tuple[Path, ...]] = {}
    for kind, base in (("safetensors", SAFE_WEIGHTS), ("pickle", PICKLE_WEIGHTS)):
        single, index = folder / _add_variant(base, variant), folder / _add_variant(base + ".index.json", variant)
        if single.is_file():
            found[kind] = (single,)
        elif index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if not shards or missing:
                raise CheckpointError(f"{str(index)!r} names shards that are not there: {missing or 'none'}")
            found[kind] = (index, *(folder / s for s in shards))
    if "safetensors" in found:
        return found["safetensors"]
    if "pickle" in found:
        if not allow_pickle:
            raise CheckpointError(f"{str(found['pickle'][0])!r} is a pickle file, which can run code when "
                                  f"loaded; convert it to safetensors or pass --allow-pickle")
        return found["pickle"]
    want = _add_variant(SAFE_WEIGHTS, variant)
    others = sorted(p.name for p in folder.glob("diffusion_pytorch_model*")) if folder.is_dir() else []
    hint = f"; there is {', '.join(others)}" + (" (pass its --variant)" if variant is None else "") if others else ""
    raise CheckpointError(f"no weights in {str(folder)!r}: expected {want} or {want}.index.json with its shards{hint}")


def _component(root: Path, components: dict[str, Any], kind: str) -> str | None:
    """The model_index.json entry for the UNet ('unet') or scheduler ('scheduler')."""
    if kind in components:
        return kind
    for name, spec in components.items():
        cls = spec[1] if isinstance(spec, list) and len(spec) == 2 else ""
        if (kind == "unet" and str(cls).startswith("UNet")) or (kind == "scheduler" and "Scheduler" in str(cls)):
            return name
    return None


def check_pipeline_components(index: Path, components: dict[str, Any]) -> tuple[str, str] | None:
    """Refuse pipelines memclean cannot score rightly, by what model_index.json lists; returns
    the (name, class) of a latent pipeline's autoencoder, or None."""
    classes = {name: spec[1] for name, spec in components.items() if isinstance(spec, list) and len(spec) == 2}
    conditioning = [n for n, c in classes.items() if n in CONDITIONING and c]
    if conditioning:
        raise CheckpointError(f"{str(index)!r} is a conditional pipeline ({', '.join(conditioning)}): memclean "
                              "scores unconditional models, whose probability-flow ODE needs no prompt")
    latent = [(n, c) for n, c in classes.items() if n in AUTOENCODER_NAMES or "Autoencoder" in str(c) or c == "VQModel"]
    if len(latent) > 1 or (latent and latent[0][1] not in AUTOENCODERS):
        raise CheckpointError(f"{str(index)!r}: autoencoder {latent} is not one memclean scores through "
                              f"({', '.join(AUTOENCODERS)}, one per pipeline)")
    return latent[0] if latent else None


def resolve_checkpoint(path: str | os.PathLike, allow_pickle: bool = False, variant: str | None = None) -> Checkpoint:
    """Find the UNet, its weights and the scheduler in any layout, or say what is missing. `path`
    may be a Hub id (ORG/NAME[@REVISION]) already in the local Hugging Face cache (score/hub.py)."""
    root, hub = model_folder(str(path), CheckpointError)
    ckpt = _resolve_folder(root, allow_pickle, variant)
    return replace(ckpt, hub=hub) if hub is not None else ckpt


def _resolve_folder(root: Path, allow_pickle: bool, variant: str | None) -> Checkpoint:
    if not root.is_dir():
        raise CheckpointError(f"model path {str(root)!r} is not a folder: expected a diffusers checkpoint "
                              "(model_index.json with unet/ and scheduler/, or config.json + weights + "
                              "scheduler_config.json)")
    index = root / "model_index.json"
    if index.is_file():
        components = _read_json(index)
        autoencoder = check_pipeline_components(index, components)
        names = {k: _component(root, components, k) for k in ("unet", "scheduler")}
        if names["unet"] is None:
            raise CheckpointError(f"{str(index)!r} lists no UNet: components {sorted(k for k in components if not k.startswith('_'))}")
        subs = {k: n if n and (root / n).is_dir() else None for k, n in names.items()}
        layout = "pipeline" if subs["unet"] else "root"
    else:
        subs = {k: k if (root / k / ("config.json" if k == "unet" else "scheduler_config.json")).is_file() else None
                for k in ("unet", "scheduler")}
        layout, autoencoder = "flat", None
    ckpt_dir = root / (subs["unet"] or "")
    if not (ckpt_dir / "config.json").is_file():
        raise CheckpointError(f"{str(ckpt_dir / 'config.json')!r} not found: expected the UNet's config "
                              "(under unet/, or at the root as google/ddpm-* and flat checkpoints have it)")
    sched = root / (subs["scheduler"] or "") / "scheduler_config.json"
    if not sched.is_file():
        raise CheckpointError(f"{str(sched)!r} not found: the noise schedule is needed to score")
    weights = weight_files(ckpt_dir, variant, allow_pickle)
    if autoencoder is not None:
        folder = root / autoencoder[0]
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{str(folder / 'config.json')!r} not found: model_index.json lists the "
                                  f"autoencoder {autoencoder[0]} ({autoencoder[1]})")
        weight_files(folder, variant, allow_pickle)
        return Checkpoint(root, layout, subs["unet"], subs["scheduler"], weights, variant, *autoencoder)
    return Checkpoint(root, layout, subs["unet"], subs["scheduler"], weights, variant)


def check_unet_config(config: dict[str, Any], where: Path) -> str:
    """The UNet class, after refusing what cannot be scored and sizes that cannot be right
    (before anything is allocated)."""
    name = str(config.get("_class_name", "UNet2DModel"))
    if name not in SCORABLE_UNETS:
        kind = "a conditional UNet (text- or image-conditioned)" if "Condition" in name else f"a {name}"
        raise CheckpointError(f"{str(where)!r} holds {kind}: memclean scores unconditional {'/'.join(SCORABLE_UNETS)} "
                              "models, whose probability-flow ODE needs no prompt or class")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise CheckpointError(f"{str(where)!r} is class-conditional (num_class_embeds / class_embed_type): "
                              "its score needs a class label; memclean scores unconditional models")
    for key, limit in LIMITS.items():
        value = config.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(v, int) and 1 <= v <= limit for v in values):
            raise CheckpointError(f"{str(where)!r}: {key} = {value!r} is not a size memclean can use (1 to {limit})")
    return name


def load_scheduler(ckpt: Checkpoint) -> Any:
    """The diffusers scheduler named by `_class_name` in scheduler_config.json, by its own loader."""
    import diffusers

    name = _read_json(ckpt.scheduler_config).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CheckpointError(f"{str(ckpt.scheduler_config)!r}: unknown scheduler class {name!r}")
    scheduler = cls.from_pretrained(ckpt.root, subfolder=ckpt.scheduler_subfolder, local_files_only=True)
    check_scheduler(scheduler, ckpt.scheduler_config)
    return scheduler


def check_scheduler(scheduler: Any, where: Path) -> None:
    """Refuse schedules without an N(0, I) prior at t = 1 and outputs memclean cannot convert."""
    config = scheduler.config
    if config.get("rescale_betas_zero_snr"):
        raise CheckpointError(f"{str(where)!r}: rescale_betas_zero_snr is on, so the SNR at t = 1 is zero and "
                              "the ODE ends on a point, not an N(0, I) prior: log volume growth is infinite there")
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is not None and float(torch.as_tensor(abar)[-1]) <= 0:
        raise CheckpointError(f"{str(where)!r}: alphas_cumprod reaches 0 (zero terminal SNR): no N(0, I) prior at t = 1")
    prediction = config.get("prediction_type", "epsilon")
    if type(scheduler).__name__ != "ScoreSdeVeScheduler" and prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"{str(where)!r}: prediction_type {prediction!r} is not one of {PREDICTION_TYPES}")


def load_component(ckpt: Checkpoint, subfolder: str | None, name: str) -> torch.nn.Module:
    """A model component through its class's from_pretrained (subfolder, safetensors, variant, shards)."""
    import diffusers

    folder = ckpt.root / (subfolder or "")
    cls = getattr(diffusers, name)
    safe = not any(".bin" in p.name for p in weight_files(folder, ckpt.variant, True))
    try:
        model = cls.from_pretrained(ckpt.root, subfolder=subfolder, use_safetensors=safe, variant=ckpt.variant,
                                    local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises many types for a broken file
        raise CheckpointError(f"cannot load {str(folder)!r} as {name}: {e}") from e
    return model.eval().requires_grad_(False)


def load_unet(ckpt: Checkpoint) -> torch.nn.Module:
    """The UNet, after its config is checked (before anything is allocated)."""
    config_path = ckpt.unet_dir / "config.json"
    return load_component(ckpt, ckpt.unet_subfolder, check_unet_config(_read_json(config_path), config_path))


class LatentEncoder(torch.nn.Module):
    """Image -> the latent a latent pipeline's UNet diffuses: z = scaling_factor * E(x).

    E(x) is what the pipeline's decoder receives before its own 1/scaling_factor: for a VQModel
    the encoder's latent before quantization (LDMPipeline decodes quantizing it), for an
    AutoencoderKL the mean of the encoder's posterior (deterministic: its mode). x is the image
    in [-1, 1], as the autoencoder was trained: [B, C, H, W] -> [B, C_z, H_z, W_z].
    """

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.scaling_factor = float(getattr(autoencoder.config, "scaling_factor", 1.0) or 1.0)
        self.factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)  # image side / latent side

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        out = self.autoencoder.encode(x.to(dtype))
        z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return (self.scaling_factor * z).to(torch.float32)


def _hash_weights(h: Any, module: torch.nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _hash_config(h: Any, part: Any) -> None:
    public = {k: v for k, v in dict(part.config).items() if not k.startswith("_")}
    h.update(json.dumps(public, sort_keys=True, default=str).encode())


def fingerprint(unet: torch.nn.Module, scheduler: Any, autoencoder: torch.nn.Module | None = None) -> str:
    """sha256 over the loaded weights (name, dtype, shape, bytes, in name order) and the configs
    (canonical JSON, without diffusers' bookkeeping keys) of the UNet and scheduler, and of a
    latent pipeline's autoencoder: the same weights and configs give the same fingerprint in
    every layout, shard split or file format."""
    h = hashlib.sha256()
    _hash_weights(h, unet)
    _hash_config(h, unet)
    _hash_config(h, scheduler)
    h.update(type(unet).__name__.encode() + type(scheduler).__name__.encode())
    if autoencoder is not None:
        _hash_weights(h, autoencoder)
        _hash_config(h, autoencoder)
        h.update(type(autoencoder).__name__.encode())
    return h.hexdigest()


class DiffusersScore(torch.nn.Module):
    """A diffusers UNet as a score function, under the DESIGN.md time convention.

    VP: eps_hat = unet(x, t (N-1)) (v_prediction and sample converted), score = -eps_hat / sigma.
    VE: the UNet takes sigma(t) and returns the score itself (ScoreSdeVe / NCSN++ convention).
    A UNet that also predicts its variance (out_channels = 2 in_channels) gives eps_hat first.
    x is in the model's data range (`data_range`: [-1, 1] for VP, [0, 1] for VE by default).
    """

    def __init__(self, unet: torch.nn.Module, schedule: VPSchedule | VESchedule,
                 prediction_type: str = "epsilon", data_range: tuple[float, float] = (-1.0, 1.0),
                 bits_per_dim_offset: float | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        if getattr(getattr(unet, "config", None), "time_embedding_type", None) == "learned":
            raise ValueError("time_embedding_type 'learned' takes integer timesteps only; "
                             "the continuous-time ODE needs a sinusoidal or Fourier embedding")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type  # what the network outputs
        self.data_range = data_range  # the range of the images the model was trained on
        # bits/dim's offset: 8-bit bins in the data range (bits_offset), or 0 for a continuous latent
        self.bits_offset = bits_offset(data_range) if bits_per_dim_offset is None else bits_per_dim_offset
        self.compiled: torch.nn.Module | None = None  # torch.compile(unet), once `compile` is called
        self.rows: int | None = None  # the compiled network's fixed batch

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def compile(self, rows: int) -> None:
        """Run the network through torch.compile (inductor, static shapes) from now on, always on
        exactly `rows` images at a time: a run compiles one graph with gradients (V's VJPs) and
        one without (the loss), whatever its batches hold. Calling it again with other rows
        recompiles once for the new shape."""
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        if self.compiled is None:
            self.compiled = torch.compile(self.unet, dynamic=False)
        self.rows = rows

    def network(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The UNet's output for x [N, C, H, W] at timesteps [N]: eagerly, or compiled in chunks of
        exactly `rows` images, the last padded with copies of its last image and the padding's
        outputs dropped (images are independent: the network normalises per sample)."""
        if self.compiled is None:
            return self.unet(x, timestep).sample
        outs = []
        for start in range(0, x.shape[0], self.rows):
            xc, tc = x[start:start + self.rows], timestep[start:start + self.rows]
            n = xc.shape[0]
            if n < self.rows:
                xc = torch.cat([xc, xc[-1:].expand(self.rows - n, *xc.shape[1:])])
                tc = torch.cat([tc, tc[-1:].expand(self.rows - n)])
            outs.append(self.compiled(xc, tc).sample[:n])
        return torch.cat(outs)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # float32 whatever the network's dtype: an fp16 timestep rounds to 0.5 near 999
        timestep = self.schedule.timestep(t).to(torch.float32).expand(x.shape[0]).to(x.device)
        out = self.network(x.to(self.dtype), timestep).to(x.dtype)[:, :x.shape[1]]
        if isinstance(self.schedule, VESchedule):
            return out
        sigma = self.schedule.sigma(t).to(x.dtype)
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

    score_fn: DiffusersScore  # s(x, t) with its schedule and data range
    fingerprint: str  # sha256 of the loaded weights and the configs
    channels: int  # the image channels the model takes
    sample_size: tuple[int, int]  # (H, W) of the images the model takes
    checkpoint: Checkpoint
    scheduler_class: str  # e.g. DDPMScheduler
    encoder: LatentEncoder | None = None  # latent pipelines: image -> the UNet's latent
    warmed: tuple | None = None  # (batch, precision) the compiled network's graphs were built for (score/ready.py)

    @property
    def data_range(self) -> tuple[float, float]:
        return self.score_fn.data_range

    @property
    def score_space(self) -> str:
        return "pixel" if self.encoder is None else "latent"

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the latent the score lives in, for latent pipelines."""
        if self.encoder is None:
            return None
        c = self.score_fn.unet.config
        size = c.sample_size if isinstance(c.sample_size, (list, tuple)) else (c.sample_size,) * 2
        return (int(c.in_channels), int(size[0]), int(size[1]))

    def record(self) -> dict[str, Any]:
        """What was loaded, for the manifest and the Parquet metadata: the checkpoint as found
        (root, layout, variant), its fingerprint, and how it scores."""
        return {"path": str(self.checkpoint.root),
                "hub": self.checkpoint.hub.to_dict() if self.checkpoint.hub is not None else None,
                "fingerprint": self.fingerprint, "layout": self.checkpoint.layout,
                "variant": self.checkpoint.variant, "data_range": list(self.data_range),
                "bits_per_dim_offset": self.score_fn.bits_offset, "score_space": self.score_space,
                "latent_shape": self.latent_shape, "autoencoder": self.checkpoint.autoencoder_class,
                "scheduler": self.scheduler_class, "channels": self.channels, "sample_size": list(self.sample_size)}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the model's data range -> what the score function takes (the latent, for
        latent pipelines; the images themselves otherwise)."""
        return x if self.encoder is None else self.encoder(x)


def resolve_data_range(choice: str, schedule: VPSchedule | VESchedule) -> tuple[float, float]:
    """auto: the family's range (VP [-1, 1], VE [0, 1]); signed or unit: that range."""
    if choice == "auto":
        choice = FAMILY_RANGE[schedule.kind]
    if choice not in DATA_RANGES:
        raise ValueError(f"data range {choice!r} is not one of {('auto', *DATA_RANGES)}")
    return DATA_RANGES[choice]


def usable_device(value: str | torch.device, option: str = "--device") -> torch.device:
    """The torch device a setting names, once this torch can run on it: a clear error for cuda
    without a CUDA device, or cuda:N past the devices it sees (scoring and training alike)."""
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {str(value)!r}: this torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {str(value)!r}: this torch sees {torch.cuda.device_count()} "
                             f"CUDA device(s), numbered from 0")
    return device


def load_model(path: str | os.PathLike, allow_pickle: bool = False, device: str | torch.device = "cpu",
               variant: str | None = None, data_range: str = "auto") -> LoadedModel:
    """Load a local checkpoint (any layout diffusers loads) as a score function on `device`."""
    try:
        device = usable_device(device)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    ckpt = resolve_checkpoint(path, allow_pickle, variant)
    scheduler = load_scheduler(ckpt)
    schedule = schedule_from_scheduler(scheduler)
    unet = load_unet(ckpt)
    c = unet.config
    if c.out_channels not in (c.in_channels, 2 * c.in_channels):
        raise CheckpointError(f"{str(ckpt.unet_dir)!r}: out_channels {c.out_channels} for in_channels "
                              f"{c.in_channels}: not a noise, v or sample prediction (nor one with its variance)")
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    size = c.sample_size
    sample_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    channels, encoder, autoencoder = int(c.in_channels), None, None
    if ckpt.autoencoder is not None:
        autoencoder = load_component(ckpt, ckpt.autoencoder, ckpt.autoencoder_class)
        if autoencoder.config.latent_channels != c.in_channels:
            raise CheckpointError(f"{str(ckpt.root)!r}: the autoencoder's {autoencoder.config.latent_channels} latent "
                                  f"channels are not the UNet's {c.in_channels} input channels")
        encoder = LatentEncoder(autoencoder.to(device))
        channels = int(autoencoder.config.in_channels)
        sample_size = (sample_size[0] * encoder.factor, sample_size[1] * encoder.factor)
        data_range = "signed" if data_range == "auto" else data_range  # autoencoders take [-1, 1] images
    # a latent is continuous: no 8-bit bins to dequantize, so bits/dim has no offset
    score_fn = DiffusersScore(unet.to(device), schedule, prediction_type, resolve_data_range(data_range, schedule),
                              None if encoder is None else 0.0)
    log.info("loaded %s (%s, %s, %s layout, data in %s%s) from %s", type(unet).__name__, type(scheduler).__name__,
             prediction_type, ckpt.layout, score_fn.data_range,
             f", latent through {ckpt.autoencoder_class}" if encoder is not None else "", ckpt.root)
    return LoadedModel(score_fn, fingerprint(unet, scheduler, autoencoder), channels, sample_size, ckpt,
                       type(scheduler).__name__, encoder)
