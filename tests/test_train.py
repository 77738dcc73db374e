"""The small DDPM trainer: a recipe that validates, a checkpoint that loads and scores."""
import json

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
                                 dict(beta_schedule="sigmoid")])
def test_bad_recipes_are_refused(bad):
    with pytest.raises(ValueError):
        TrainSettings(**bad)
