"""Embedders for duplicate search: the pixel thumbnail's tolerances, the registry, TorchScript
models and the data range they are given."""
import numpy as np
import pytest
import torch

from pipeline.decide.embeddings import PixelEmbedder, make_embedder


class Mean(torch.nn.Module):
    """A TorchScript 'model' whose output is its input's mean colour."""

    def forward(self, x):
        return x.mean((2, 3))


def test_embedder_registry_and_torchscript(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.script(Mean()).save(str(path))
    emb = make_embedder(f"torchscript:{path}", size=16)
    out = emb(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert out.shape == (2, 3) and torch.allclose(out.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="not found"):
        make_embedder("torchscript:/nonexistent.pt")
    with pytest.raises(ValueError, match="one of"):
        make_embedder("sscd")


def test_pixel_embedder_tolerates_one_image_pixel_on_small_images():
    """On images smaller than the 32 px thumbnail, one image pixel spans several thumbnail
    pixels: the shift search widens to one image pixel, so a 1 px shift of a 16 px image is
    still a duplicate, while an unrelated image is not."""
    rng = np.random.default_rng(0)
    img = torch.zeros(2, 1, 16, 16)
    img[0, 0, 3:13, 5:9] = 1.0
    img[0, 0, 4:7, 3:12] = 0.6
    img[1] = torch.from_numpy(rng.uniform(-1, 1, (1, 16, 16)).astype(np.float32))
    shifted = torch.zeros_like(img[:1])
    shifted[0, 0, 1:, 1:] = img[0, 0, :-1, :-1]  # 1 px down-right, the edge left at 0
    for side, expect in ((16, True), (None, False)):
        emb = PixelEmbedder(image_side=side)
        v, w = emb(img).numpy(), emb(shifted).numpy()
        sims = emb.similarity(np.repeat(w, 2, 0), v)
        assert (sims[0] >= emb.default_threshold) == expect, (side, sims)
        assert sims[1] < 0.5
    assert PixelEmbedder(image_side=64).max_shift == 1 and PixelEmbedder(image_side=16).max_shift == 2


def test_pixel_vectors_ignore_brightness_and_contrast():
    """Mean-removed, unit-norm thumbnails: an affine change of intensity (any data range
    included) leaves the vector unchanged, up to float32 rounding of the blur and norm."""
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    emb = PixelEmbedder(image_side=32)
    v = emb(x)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(emb(0.5 * x + 0.3), v, atol=64 * 2.0**-23)
    assert torch.allclose(emb((x + 1) / 2), v, atol=64 * 2.0**-23)  # [0, 1] as VE models see images


def test_a_torchscript_embedder_gets_rgb_in_zero_one_whatever_the_model_range(tmp_path):
    path = tmp_path / "mean.pt"
    torch.jit.script(Mean()).save(str(path))
    signed = make_embedder(f"torchscript:{path}", size=8)
    unit = make_embedder(f"torchscript:{path}", size=8)
    unit.data_range = (0.0, 1.0)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(signed(x * 2 - 1), unit(x), atol=1e-6)
