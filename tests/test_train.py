"""The small DDPM trainer: a recipe that validates, a checkpoint that loads and scores."""
import json
from dataclasses import replace

import pytest
import torch

from pipeline.io.data import ImageSpec, discover
from pipeline.score.models import load_model
from pipeline.score.volume import ScorerSettings, log_volume_growth
from pipeline.tools.train import TrainSettings, load_images, train


def test_a_few_steps_make_a_checkpoint_memclean_loads(tmp_path, write_images):
    data = write_images(n=6, size=(8, 8))
    s = TrainSettings(sample_size=8, channels=1, block_out_channels=(8, 16), steps=3, batch_size=4,
                      beta_schedule="squaredcos_cap_v2")
    images = load_images(discover(data), ImageSpec(1, (8, 8)))
    assert images.shape == (6, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    losses = []
    out = train(images, tmp_path / "m", s, lambda step, loss: losses.append(loss), recipe={"command": "test"})
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    recipe = json.loads((out / "training.json").read_text())
    assert recipe["settings"]["beta_schedule"] == "squaredcos_cap_v2" and recipe["images"] == 6
    m = load_model(out)
    assert m.scheduler_class == "DDPMScheduler" and m.checkpoint.layout == "pipeline"
    r = log_volume_growth(m.score_fn, images[:2], ScorerSettings(solver="euler", steps=2))
    assert torch.isfinite(r.log_volume_growth).all()


@pytest.mark.parametrize("bad", [dict(steps=0), dict(sample_size=6, block_out_channels=(8, 16, 16)),
                                 dict(beta_schedule="sigmoid"), dict(device="gpu"), dict(device="cuda:x")])
def test_bad_recipes_are_refused(bad):
    with pytest.raises(ValueError):
        TrainSettings(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_training_on_a_missing_gpu_says_so(tmp_path):
    s = TrainSettings(sample_size=8, channels=1, block_out_channels=(8, 16), steps=1, batch_size=2, device="cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        train(torch.zeros(2, 1, 8, 8), tmp_path / "m", s)
    assert not (tmp_path / "m").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_the_gpu_draws_what_the_cpu_draws(tmp_path, monkeypatch):
    """Batches and noise come from the CPU generator, so one step on each device starts from the
    same loss: the same initial weights and inputs, fp32 rounding apart (TF32 off: 2^-24 relative
    per operation over the UNet's ~40 layers, times a 100x margin)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    losses = {}
    for device in ("cpu", "cuda"):
        s = TrainSettings(sample_size=8, channels=1, block_out_channels=(8, 16), steps=1, batch_size=4, device=device)
        got = []
        train(x, tmp_path / device, s, lambda step, loss: got.append(loss))
        losses[device] = got[0]
    assert abs(losses["cpu"] - losses["cuda"]) <= 100 * 40 * 2.0**-24 * abs(losses["cpu"])


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(next((model_dir / "unet").glob("*.safetensors"))))


def test_training_continues_from_a_checkpoint_and_keeps_its_recipe(tmp_path):
    """--init-from loads the earlier UNet: one AdamW step at lr moves each weight by at most
    lr (Adam's first update is lr * m/(sqrt(v) + eps) with |m| = sqrt(v), so |update| <= lr,
    weight decay 0), so at lr 1e-9 the continued weights are the earlier ones to 1e-9 plus
    float32 rounding (2^-24 of the weight), while a fresh initialisation differs by O(0.1)."""
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    s = TrainSettings(sample_size=8, channels=1, block_out_channels=(8, 16), steps=2, batch_size=4)
    first = train(x, tmp_path / "first", s, recipe={"command": "first"})
    cont = replace(s, steps=1, lr=1e-9, seed=5, init_from=str(first))
    second = train(x, tmp_path / "second", cont, recipe={"command": "second"})
    fresh = train(x, tmp_path / "fresh", replace(s, steps=1, lr=1e-9, seed=5))
    a, b, c = _weights(first), _weights(second), _weights(fresh)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(b[k], a[k], rtol=2.0**-23, atol=1e-9 * 1.01), k
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-3
    recipe = json.loads((second / "training.json").read_text())
    assert recipe["command"] == "second" and recipe["init_from"]["command"] == "first"
    assert recipe["total_steps"] == 3 and recipe["settings"]["init_from"] == str(first)


def test_continuing_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    first = train(x, tmp_path / "first", TrainSettings(sample_size=8, channels=1, block_out_channels=(8, 16), steps=1,
                                                       batch_size=4))
    wider = TrainSettings(sample_size=8, channels=1, block_out_channels=(8, 32), steps=1, batch_size=4,
                          init_from=str(first))
    with pytest.raises(ValueError, match="does not match"):
        train(x, tmp_path / "second", wider)
    with pytest.raises(ValueError, match="expected one unet"):
        train(x, tmp_path / "third", replace(wider, init_from=str(tmp_path / "nowhere")))
    assert not (tmp_path / "second").exists() and not (tmp_path / "third").exists()
