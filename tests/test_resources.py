"""What a process shares: one load per unchanged checkpoint, one cache per namespace."""
from diffusers import DDPMScheduler

from pipeline.run.resources import Resources, checkpoint_stamp
from pipeline.score.models import ModelSettings
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet


def test_a_checkpoint_loads_once_until_it_is_rewritten(tmp_path):
    """The run and its in-process scoring share one loaded model; a checkpoint rewritten at
    the same path (a retrain) is not served from the earlier load."""
    path = save_checkpoint(tiny_unet(seed=0), DDPMScheduler(num_train_timesteps=100), tmp_path / "m")
    shared, settings = Resources(), ModelSettings(model=str(path))
    first = shared.model(settings)
    assert shared.model(settings) is first
    stamp = checkpoint_stamp(str(path))
    save_checkpoint(tiny_unet(seed=1), DDPMScheduler(num_train_timesteps=100), path)
    assert checkpoint_stamp(str(path)) != stamp
    again = shared.model(settings)
    assert again is not first and again.fingerprint != first.fingerprint


def test_models_are_bounded_and_cleared(tmp_path):
    shared = Resources(max_models=1)
    a = ModelSettings(model=str(save_checkpoint(tiny_unet(seed=0), DDPMScheduler(), tmp_path / "a")))
    b = ModelSettings(model=str(save_checkpoint(tiny_unet(seed=1), DDPMScheduler(), tmp_path / "b")))
    first = shared.model(a)
    shared.model(b)
    assert shared.model(a) is not first  # evicted by b
    cache = shared.cache(str(tmp_path / "c"), "k")
    assert shared.cache(str(tmp_path / "c"), "k") is cache
    shared.clear()
    assert shared.cache(str(tmp_path / "c"), "k") is not cache


def test_an_embedder_is_made_once_per_process_until_its_file_changes(tmp_path):
    """Every scoring shard asks for the embedder: a TorchScript file is loaded once, not once a
    shard, and loaded again when it is rewritten."""
    import os

    import torch

    from tests.test_embeddings import Mean

    shared = Resources()
    model = shared.model(ModelSettings(model=str(save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "m"))))
    assert shared.embedder("pixel", model, 224, "cpu") is shared.embedder("pixel", model, 224, "cpu")
    path = tmp_path / "e.pt"
    torch.jit.script(Mean()).save(str(path))
    first = shared.embedder(f"torchscript:{path}", model, 16, "cpu")
    assert shared.embedder(f"torchscript:{path}", model, 16, "cpu") is first
    assert shared.embedder(f"torchscript:{path}", model, 32, "cpu") is not first  # another input side
    torch.jit.script(Mean()).save(str(path))
    os.utime(path, ns=(1, 1))  # rewritten: a new stamp even within the clock's resolution
    assert shared.embedder(f"torchscript:{path}", model, 16, "cpu") is not first
