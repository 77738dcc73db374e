"""Checkpoint loading through diffusers (every layout, variants, shards, pickle refusal),
refusals of what cannot be scored, fingerprints, data ranges and prediction types."""
import json

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, ScoreSdeVeScheduler, UNet2DConditionModel)

from pipeline.score.models import CheckpointError, DiffusersScore, load_model, resolve_checkpoint, usable_device
from pipeline.score.schedules import InterpolatedVP, LinearVP, VESchedule
from pipeline.score.volume import ScorerSettings, log_volume_growth
from tests.conftest import save_checkpoint
from tests.exact import GaussianScore, tiny_unet

LAYOUTS = ["flat", "pipeline", "root", "sharded"]
TWO_LEVELS = dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def save_layout(unet, scheduler, path, layout):
    """The same weights in each layout users have: save_pretrained pipelines (optionally with
    sharded weights), a UNet and scheduler saved into one folder, and google/ddpm-*'s root
    layout (model_index.json beside the UNet's own files, written by hand as those ship)."""
    if layout in ("flat", "pipeline"):
        return save_checkpoint(unet, scheduler, path, layout)
    if layout == "sharded":
        save_checkpoint(unet, scheduler, path, "pipeline")
        for f in (path / "unet").glob("diffusion_pytorch_model*"):
            f.unlink()
        unet.save_pretrained(path / "unet", max_shard_size="40KB")
        assert (path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
        return path
    unet.save_pretrained(path)
    scheduler.save_pretrained(path)
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.1.0",
        "scheduler": ["diffusers", type(scheduler).__name__], "unet": ["diffusers", type(unet).__name__]}))
    return path


def score_of(model, x, steps=2):
    return log_volume_growth(model.score_fn, x, ScorerSettings(solver="heun", steps=steps)).log_volume_growth


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_with_the_same_fingerprint_and_scores(tmp_path, layout):
    unet, sched = tiny_unet(), DDPMScheduler()
    flat = load_model(save_layout(unet, sched, tmp_path / "flat", "flat"))
    other = load_model(save_layout(unet, sched, tmp_path / layout, layout))
    assert other.checkpoint.layout == {"sharded": "pipeline"}.get(layout, layout)
    assert other.fingerprint == flat.fingerprint and len(flat.fingerprint) == 64
    assert (other.channels, other.sample_size, other.scheduler_class) == (1, (8, 8), "DDPMScheduler")
    assert isinstance(other.score_fn.schedule, LinearVP)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(score_of(other, x), score_of(flat, x))


def test_a_weight_variant_loads_with_variant_and_is_named_without(tmp_path):
    path = tmp_path / "m"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(path, variant="fp16")
    assert (path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(CheckpointError, match="--variant"):
        load_model(path)
    m = load_model(path, variant="fp16")
    assert m.checkpoint.variant == "fp16" and m.checkpoint.weights[0].name.endswith(".fp16.safetensors")
    assert torch.isfinite(score_of(m, torch.rand(1, 1, 8, 8) * 2 - 1)).all()


@pytest.mark.parametrize("scheduler", [DDPMScheduler(), DDIMScheduler(), PNDMScheduler(),
                                       DPMSolverMultistepScheduler(), EulerDiscreteScheduler(),
                                       DDPMScheduler(prediction_type="v_prediction"),
                                       ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0)],
                         ids=lambda s: type(s).__name__ + "-" + s.config.get("prediction_type", ""))
def test_pipelines_of_each_scheduler_load_and_score(tmp_path, scheduler):
    m = load_model(save_layout(tiny_unet(), scheduler, tmp_path / "m", "pipeline"))
    assert m.scheduler_class == type(scheduler).__name__
    ve = isinstance(scheduler, ScoreSdeVeScheduler)
    assert m.data_range == ((0.0, 1.0) if ve else (-1.0, 1.0))
    assert torch.isfinite(score_of(m, torch.rand(2, 1, 8, 8))).all()


def test_fingerprint_changes_with_weights_and_schedule(tmp_path):
    base = load_model(save_checkpoint(tiny_unet(seed=0), DDPMScheduler(), tmp_path / "a")).fingerprint
    other_weights = load_model(save_checkpoint(tiny_unet(seed=1), DDPMScheduler(), tmp_path / "b")).fingerprint
    other_sched = load_model(save_checkpoint(tiny_unet(seed=0), DDPMScheduler(beta_end=0.01), tmp_path / "c")).fingerprint
    assert len({base, other_weights, other_sched}) == 3


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_pickle_only_checkpoint_is_refused_without_the_flag(tmp_path, layout):
    path = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "m", layout, safe=False)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_model(path)
    m = load_model(path, allow_pickle=True)
    assert m.checkpoint.weights[0].name == "diffusion_pytorch_model.bin"
    assert m.fingerprint == load_model(save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "s", layout)).fingerprint


def refuse(path, match):
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_conditional_and_class_conditional_unets_are_refused(tmp_path):
    cond = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    refuse(save_checkpoint(cond, DDPMScheduler(), tmp_path / "cond"), "conditional")
    from diffusers import UNet2DModel

    classes = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, num_class_embeds=10,
                          block_out_channels=(8, 16), norm_num_groups=4, **TWO_LEVELS)
    refuse(save_checkpoint(classes, DDPMScheduler(), tmp_path / "cls"), "class-conditional")


def test_latent_and_text_pipelines_are_refused(tmp_path):
    path = save_layout(tiny_unet(), DDPMScheduler(), tmp_path / "ldm", "pipeline")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "vqvae": ["diffusers", "VQModel"]}))
    refuse(path, "latent")
    (path / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "CLIPTextModel"]}))
    refuse(path, "conditional")


def test_schedules_without_a_gaussian_prior_and_unknown_outputs_are_refused(tmp_path):
    refuse(save_checkpoint(tiny_unet(), DDPMScheduler(rescale_betas_zero_snr=True), tmp_path / "z"), "zero")
    path = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "p")
    config = json.loads((path / "scheduler_config.json").read_text())
    (path / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "flow"}))
    refuse(path, "prediction_type")


@pytest.mark.parametrize("key,value", [("sample_size", 10**9), ("in_channels", -3), ("block_out_channels", [8, -16]),
                                       ("layers_per_block", 0)])
def test_absurd_configs_fail_before_anything_is_allocated(tmp_path, monkeypatch, key, value):
    path = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: value}))
    import diffusers

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", lambda *a, **k: pytest.fail("allocated"))
    refuse(path, key)


def test_a_unet_that_predicts_its_variance_scores_with_its_noise_half(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4, **TWO_LEVELS).eval()
    m = load_model(save_checkpoint(unet, DDPMScheduler(variance_type="learned_range"), tmp_path / "m"))
    x, t = torch.rand(2, 1, 8, 8), torch.tensor(0.5, dtype=torch.float64)
    eps = unet(x, torch.full((2,), 0.5 * 999)).sample[:, :1]
    assert torch.allclose(m.score_fn.score(x, t), -eps / m.score_fn.schedule.sigma(t).float(), rtol=1e-6, atol=1e-6)


def test_the_timestep_stays_float32_for_a_half_precision_network():
    seen = []

    class HalfNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float16))

        def forward(self, x, timestep):
            seen.append(timestep)
            return type("Out", (), {"sample": x * self.w})()

    score = DiffusersScore(HalfNet(), LinearVP(1000, 1e-4, 0.02))
    score.score(torch.rand(1, 1, 2, 2), torch.tensor(0.9995, dtype=torch.float64))
    assert seen[0].dtype == torch.float32 and float(seen[0][0]) == pytest.approx(0.9995 * 999, abs=1e-4)


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
    path = save_layout(tiny_unet(), DDPMScheduler(), tmp_path / "noweights", "pipeline")
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*unet.*diffusion_pytorch_model.safetensors"):
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
    for k in (10, 500, 989):
        # t (N - 1) = k is exact in the float32 timestep, so the network sees t itself; the
        # conversions are float64 arithmetic on O(1) values divided by sigma >= 0.1: 1e-13
        t = torch.tensor(k / 999, dtype=torch.float64)
        assert torch.allclose(wrapped.score(x, t), gauss.score(x, t), rtol=1e-11, atol=1e-11)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersScore(tiny_unet(), LinearVP(1000, 1e-4, 0.02), "flow")


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_latent_pipelines_score_the_latent_their_unet_diffuses(tmp_path, kind):
    """The scorer's latent is exactly what the pipeline's UNet works in: scaling_factor times the
    VQModel's latent before quantization (LDMPipeline divides the scaling back out and decodes
    it, quantizing) or the AutoencoderKL posterior's mean."""
    from tests.exact import save_latent_pipeline

    m = load_model(save_latent_pipeline(tmp_path / "ldm", kind))
    ae = m.encoder.autoencoder
    assert m.score_space == "latent" and m.checkpoint.autoencoder_class == ("VQModel" if kind == "vq" else "AutoencoderKL")
    assert (m.channels, m.sample_size) == (3, (16, 16)) and m.latent_shape == (ae.config.latent_channels, 8, 8)
    assert m.data_range == (-1.0, 1.0) and m.score_fn.bits_offset == 0.0
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        own = ae.encode(x)
        expected = ae.config.scaling_factor * (own.latents if kind == "vq" else own.latent_dist.mean)
        assert torch.equal(m.prepare(x), expected)
    r = log_volume_growth(m.score_fn, m.prepare(x), ScorerSettings(solver="heun", steps=2))
    assert torch.isfinite(r.log_volume_growth).all()


def test_the_fingerprint_covers_the_autoencoder(tmp_path):
    from diffusers import DDPMScheduler as Sched

    from tests.exact import save_latent_pipeline, tiny_unet as unet

    a = load_model(save_latent_pipeline(tmp_path / "a", "vq", unet(channels=3, size=8), Sched(), seed=0))
    b = load_model(save_latent_pipeline(tmp_path / "b", "vq", unet(channels=3, size=8), Sched(), seed=1))
    assert a.fingerprint != b.fingerprint  # same UNet and schedule, another autoencoder


def test_unsupported_autoencoders_are_refused(tmp_path):
    from tests.exact import save_latent_pipeline

    path = save_latent_pipeline(tmp_path / "ldm", "vq")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "vqvae": ["diffusers", "AutoencoderTiny"]}))
    refuse(path, "not one memclean scores through")


def test_a_device_this_torch_cannot_use_is_refused_before_any_work(tmp_path, monkeypatch):
    """Scoring and training share one check: cpu passes; cuda without a CUDA device, or cuda:N
    past the devices torch sees, is a clear error (the CUDA queries are stubbed so that every
    branch runs on any machine); load_model says so before it reads the checkpoint."""
    assert usable_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        usable_device("cuda")
    with pytest.raises(CheckpointError, match="sees no CUDA device"):
        load_model(tmp_path / "no-such-model", device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usable_device("cuda:1") == torch.device("cuda:1")
    assert usable_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="sees 2 CUDA device"):
        usable_device("cuda:2", option="--embed-device")
