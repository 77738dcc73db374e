"""Checkpoint loading (both layouts, pickle refusal), fingerprints and prediction types."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, ScoreSdeVeScheduler

from pipeline.models import CheckpointError, DiffusersScore, load_model, resolve_checkpoint
from pipeline.schedules import InterpolatedVP, LinearVP, VESchedule
from tests.conftest import save_checkpoint
from tests.exact import GaussianScore, tiny_unet


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_both_layouts_load_with_the_same_fingerprint(tmp_path, layout):
    unet, sched = tiny_unet(), DDPMScheduler()
    a = load_model(save_checkpoint(unet, sched, tmp_path / "a", layout))
    b = load_model(save_checkpoint(unet, sched, tmp_path / "b", layout))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert (a.channels, a.sample_size, a.scheduler_class) == (1, (8, 8), "DDPMScheduler")
    assert isinstance(a.score_fn.schedule, LinearVP)
    x = torch.rand(2, 1, 8, 8)
    t = torch.tensor(0.3, dtype=torch.float64)
    assert torch.allclose(a.score_fn.score(x, t), DiffusersScore(unet, a.score_fn.schedule).score(x, t))


def test_fingerprint_changes_with_weights_and_schedule(tmp_path):
    base = load_model(save_checkpoint(tiny_unet(seed=0), DDPMScheduler(), tmp_path / "a")).fingerprint
    other_weights = load_model(save_checkpoint(tiny_unet(seed=1), DDPMScheduler(), tmp_path / "b")).fingerprint
    other_sched = load_model(save_checkpoint(tiny_unet(seed=0), DDPMScheduler(beta_end=0.01), tmp_path / "c")).fingerprint
    assert len({base, other_weights, other_sched}) == 3


def test_pickle_only_checkpoint_is_refused_without_the_flag(tmp_path):
    path = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "m", safe=False)
    assert (path / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_model(path)
    assert load_model(path, allow_pickle=True).paths.weights.name.endswith(".bin")


def test_missing_and_broken_checkpoints_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        resolve_checkpoint(tmp_path / "empty")
    path = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "m")
    (path / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        resolve_checkpoint(path)
    path = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "broken")
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_model(path)
    path = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "nosched")
    (path / "scheduler_config.json").write_text(json.dumps({"_class_name": "NoSuchScheduler"}))
    with pytest.raises(CheckpointError, match="NoSuchScheduler"):
        load_model(path)


def test_scheduler_kinds(tmp_path):
    cos = load_model(save_checkpoint(tiny_unet(), DDIMScheduler(beta_schedule="squaredcos_cap_v2"), tmp_path / "c"))
    assert isinstance(cos.score_fn.schedule, InterpolatedVP)
    ve = load_model(save_checkpoint(tiny_unet(), ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0), tmp_path / "v"))
    assert isinstance(ve.score_fn.schedule, VESchedule)


class GaussianNet(torch.nn.Module):
    """A 'network' that outputs the exact eps, v or x_0 prediction for Gaussian data."""

    def __init__(self, gauss: GaussianScore, prediction_type: str):
        super().__init__()
        self.gauss, self.prediction_type = gauss, prediction_type
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timestep):
        t = timestep[0].double() / (self.gauss.schedule.N - 1)
        s = self.gauss.schedule
        sigma, sqrt_abar = s.sigma(t), s.abar(t).sqrt()
        eps = -sigma * self.gauss.score(x.double(), t)
        x0 = (x.double() - sigma * eps) / sqrt_abar
        out = {"epsilon": eps, "v_prediction": sqrt_abar * eps - sigma * x0, "sample": x0}[self.prediction_type]
        return type("Out", (), {"sample": out.to(x.dtype)})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_convert_to_the_same_score(prediction_type):
    schedule = LinearVP(1000, 1e-4, 0.02)
    gauss = GaussianScore(torch.zeros(1, 2, 2) + 0.3, torch.full((1, 2, 2), 0.5), schedule)
    wrapped = DiffusersScore(GaussianNet(gauss, prediction_type).double(), schedule, prediction_type)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    for t in (0.01, 0.5, 0.99):
        t = torch.tensor(t, dtype=torch.float64)
        assert torch.allclose(wrapped.score(x, t), gauss.score(x, t), rtol=1e-9, atol=1e-9)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersScore(tiny_unet(), LinearVP(1000, 1e-4, 0.02), "flow")
