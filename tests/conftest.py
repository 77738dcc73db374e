import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_torch_and_isolate_cache(tmp_path, monkeypatch):
    """Every test starts from the same global RNG state, with its own empty score cache."""
    torch.manual_seed(1234)
    monkeypatch.setenv("MEMCLEAN_CACHE", str(tmp_path / "score-cache"))


def save_checkpoint(unet, scheduler, path, layout="flat", safe=True):
    """Write `unet` and `scheduler` as a diffusers checkpoint in the flat or pipeline layout."""
    if layout == "flat":
        unet.save_pretrained(path, safe_serialization=safe)
        scheduler.save_pretrained(path)
    else:
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=safe)
    return path


@pytest.fixture
def write_images(tmp_path):
    """write_images(n, size, mode) -> folder of n random PNGs."""
    import numpy as np
    from PIL import Image

    def make(n=4, size=(8, 8), mode="L", folder="images", seed=0):
        rng = np.random.default_rng(seed)
        root = tmp_path / folder
        root.mkdir(parents=True, exist_ok=True)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        for i in range(n):
            arr = rng.integers(0, 256, (size[0], size[1], channels), dtype=np.uint8)
            Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(root / f"img{i:03d}.png")
        return root

    return make


@pytest.fixture
def zero_model(tmp_path):
    """A 4x4 RGB DDPM checkpoint whose UNet is all zeros (its score is exactly -x / sigma^2)."""
    from diffusers import DDPMScheduler

    from tests.exact import tiny_unet

    unet = tiny_unet(channels=3, size=4)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    return save_checkpoint(unet, DDPMScheduler(beta_start=1e-4, beta_end=0.02), tmp_path / "zero")
