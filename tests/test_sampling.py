"""score/sampling.py: DDIM generations against closed forms (a zero network), their noise
blocks, the cache and resuming."""
import numpy as np
import pytest
import torch

from pipeline.score.models import load_model
from pipeline.score.sampling import BLOCK, SampleSettings, ddim_scheduler, generate


def zero_net_sample(path, n, steps, seed):
    """DDIM (eta 0) with eps_hat = 0 is x_{t-1} = sqrt(abar_{t-1} / abar_t) x_t, so the whole chain
    scales the noise by sqrt(abar_final / abar_first): the closed form."""
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.from_pretrained(path).config)
    sched = ddim_scheduler(config, steps)
    first = sched.alphas_cumprod[sched.timesteps[0]]
    noise = torch.randn((BLOCK, 3, 4, 4), generator=torch.Generator().manual_seed(seed))[:n]
    return (noise * (sched.final_alpha_cumprod / first).sqrt()).clamp(-1, 1)


@pytest.fixture
def mild_zero_model(tmp_path):
    """A zero network under a mild schedule (abar at the last step 0.58, no clipping), so that the
    closed form's scale, sqrt(1 / 0.58), leaves most values inside [-1, 1] (a steep schedule would
    clamp every one to its sign)."""
    from diffusers import DDPMScheduler

    from tests.conftest import save_checkpoint
    from tests.exact import tiny_unet

    unet = tiny_unet(channels=3, size=4)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    return save_checkpoint(unet, DDPMScheduler(beta_start=1e-4, beta_end=1e-3, clip_sample=False), tmp_path / "mild")


def test_zero_network_gives_the_closed_form(mild_zero_model):
    model = load_model(mild_zero_model)
    images, record = generate(model, SampleSettings(generations=7, sample_steps=10, sample_seed=3), batch=3)
    want = zero_net_sample(mild_zero_model, 7, 10, 3)
    assert 0.3 < np.mean(np.abs(want.numpy()) < 1) < 1  # the closed form is not all clamped
    # DDIM's step in float32: 10 products of ratios near 1, so a few float32 ulps of the values
    assert np.allclose(images, want.numpy(), atol=1e-5)
    assert record["fresh"] == 7 and record["cached"] == 0 and record["network_passes"] == 70


def test_generations_do_not_depend_on_count_or_batch(zero_model, tmp_path):
    model = load_model(zero_model)
    a, _ = generate(model, SampleSettings(generations=5, sample_steps=4), batch=5)
    b, _ = generate(model, SampleSettings(generations=9, sample_steps=4), batch=2)
    assert np.array_equal(a, b[:5])  # a zero network: the same arithmetic row by row


def test_cache_resumes_without_sampling_again(zero_model, tmp_path):
    model = load_model(zero_model)
    cache = str(tmp_path / "cache")
    first, r1 = generate(model, SampleSettings(generations=4, sample_steps=4), cache_dir=cache)
    more, r2 = generate(model, SampleSettings(generations=6, sample_steps=4), cache_dir=cache)
    assert r1["fresh"] == 4 and r2["cached"] == 4 and r2["fresh"] == 2 and r2["network_passes"] == 8
    assert np.array_equal(first, more[:4])
    again, r3 = generate(model, SampleSettings(generations=6, sample_steps=4), cache_dir=cache)
    assert r3["fresh"] == 0 and np.array_equal(again, more)
    mapped, _ = generate(model, SampleSettings(generations=6, sample_steps=4), cache_dir=cache, out=tmp_path / "g.npy")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, more)  # written to the file, read back mapped
    _, r4 = generate(model, SampleSettings(generations=6, sample_steps=5), cache_dir=cache)  # other steps: other key
    assert r4["fresh"] == 6 and r4["key"] != r2["key"]


def test_a_damaged_cache_block_is_sampled_again(zero_model, tmp_path):
    model = load_model(zero_model)
    cache = tmp_path / "cache"
    good, r = generate(model, SampleSettings(generations=3, sample_steps=4), cache_dir=str(cache))
    (cache / "generations" / r["key"] / "block-000000.npy").write_bytes(b"not a numpy file")
    again, r2 = generate(model, SampleSettings(generations=3, sample_steps=4), cache_dir=str(cache))
    assert r2["fresh"] == 3 and np.array_equal(good, again)


def test_ve_models_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="VP"):
        ddim_scheduler({"_class_name": "ScoreSdeVeScheduler", "sigma_max": 50.0, "sigma_min": 0.01}, 10)
    with pytest.raises(ValueError, match="generations"):
        SampleSettings(generations=0)
    with pytest.raises(ValueError, match="sample-steps"):
        SampleSettings(sample_steps=0)


def test_latent_pipelines_decode_through_their_autoencoder(tmp_path):
    """A latent pipeline's generations are images: its autoencoder's decoding of the sampled
    latent (z / scaling_factor), at the image's size and channels, clamped to the data range."""
    from tests.exact import save_latent_pipeline

    path = save_latent_pipeline(tmp_path / "ldm", "kl")
    model = load_model(path)
    images, _ = generate(model, SampleSettings(generations=2, sample_steps=2))
    assert images.shape == (2, model.channels, *model.sample_size) and images.min() >= -1 and images.max() <= 1
    z = torch.randn((BLOCK, *model.latent_shape), generator=torch.Generator().manual_seed(0))[:2]
    from pipeline.score.sampling import ddim_sample, ddim_scheduler
    from pipeline.score.models import load_scheduler

    sched = ddim_scheduler(dict(load_scheduler(model.checkpoint).config), 2)
    latent = ddim_sample(model.score_fn.network, sched, z, 2)
    decoded = model.encoder.autoencoder.decode(latent / model.encoder.scaling_factor).sample.clamp(-1, 1)
    assert np.allclose(images, decoded.detach().numpy(), atol=1e-5)  # the same arithmetic, float32 rounding


def test_bf16_sampling_is_its_own_cache_entry_and_keeps_the_closed_form(mild_zero_model, tmp_path):
    """--precision bf16 runs the network under bf16 autocast (as scoring does): a zero network's
    output is exactly 0 in any precision, so the closed form holds to float32 rounding as in
    fp32; the generations are cached apart from fp32's (another key)."""
    model = load_model(mild_zero_model)
    cache = str(tmp_path / "cache")
    fp32, r32 = generate(model, SampleSettings(generations=3, sample_steps=10, sample_seed=3), cache_dir=cache)
    bf16, r16 = generate(model, SampleSettings(generations=3, sample_steps=10, sample_seed=3, precision="bf16"),
                         cache_dir=cache)
    assert r16["precision"] == "bf16" and r32["precision"] == "fp32" and r16["key"] != r32["key"]
    assert r16["fresh"] == 3 and np.allclose(bf16, zero_net_sample(mild_zero_model, 3, 10, 3).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="precision"):
        SampleSettings(precision="fp8")


def test_compiled_sampling_matches_eager(tmp_path):
    """--compile on: the network runs through torch.compile (inductor on the CPU) at the batch's
    size, the last batch padded, and the generations match eager ones to float32 rounding:
    fused kernels reorder sums (about 1e-6 of an activation per layer, a few dozen layers), and
    the mild schedule's DDIM steps scale an error by at most sqrt(1 / 0.58) each, so 1e-4 over
    three steps bounds it."""
    from diffusers import DDPMScheduler

    from tests.conftest import save_checkpoint
    from tests.exact import tiny_unet

    path = save_checkpoint(tiny_unet(channels=3, size=4), DDPMScheduler(beta_start=1e-4, beta_end=1e-3,
                                                                         clip_sample=False), tmp_path / "m")
    settings = SampleSettings(generations=5, sample_steps=3)
    eager, _ = generate(load_model(path), settings, batch=4)
    compiled, record = generate(load_model(path), settings, batch=4, compile_network=True)
    assert record["compiled"] and np.allclose(compiled, eager, atol=1e-4)
