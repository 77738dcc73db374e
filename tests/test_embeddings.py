"""Embedders for duplicate search: the pixel thumbnail's tolerances, the registry, TorchScript
models and the data range they are given."""
import numpy as np
import pytest
import torch

from pipeline.decide.embeddings import PixelEmbedder, _gaussian_blur, make_embedder


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


def _photo_like(rng, size=64, smooth=None):
    """A 1/f-textured grey image in [-1, 1]; `smooth` adds a shared layout (gradient)."""
    from tests.planted import pink_noise

    img = 0.3 * pink_noise(rng, size)
    if smooth is not None:
        img = img * 0.05 + smooth  # faint texture over a strong shared layout
    return torch.tensor(np.clip(img, -1, 1), dtype=torch.float32)[None, None].expand(1, 3, size, size)


def test_a_shared_smooth_layout_is_not_a_duplicate_but_a_corner_crop_is():
    """Two skies with one gradient correlate as thumbnails; their detail does not. A 5% crop from
    a corner (decoded back to the same side) is within the +-5% zooms and one-pixel shifts."""
    rng = np.random.default_rng(0)
    emb = PixelEmbedder(image_side=64)
    yy = np.mgrid[0:64, 0:64][0] / 64
    sky_a, sky_b = _photo_like(rng, smooth=yy - 0.5), _photo_like(rng, smooth=yy - 0.5)
    va, vb = emb(sky_a).numpy(), emb(sky_b).numpy()
    assert float((va @ vb.T)[0, 0]) > 0.95  # the plain thumbnail correlation would call them copies
    assert emb.similarity(va, vb)[0] < emb.default_threshold
    photo = _photo_like(rng)
    crop = torch.nn.functional.interpolate(photo[..., :61, :61], size=(64, 64), mode="bilinear",
                                           antialias=True, align_corners=False)
    assert emb.similarity(emb(photo).numpy(), emb(crop).numpy())[0] >= emb.default_threshold


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_flat_images_join_nothing_by_similarity(data_range):
    """Under one grey level of std a thumbnail is noise: its vector is shorter than 1 and its
    similarity to anything is -1 (exact copies still join by pixel hash); the level is in the
    model's data range."""
    lo, hi = data_range
    rng = np.random.default_rng(1)
    emb = PixelEmbedder(image_side=64, data_range=data_range)
    dark = lambda: torch.full((1, 3, 64, 64), lo + 0.1 * (hi - lo)) + \
        0.2 * (hi - lo) / 255 * torch.tensor(rng.normal(size=(1, 1, 64, 64)), dtype=torch.float32)
    a, b = emb(dark()).numpy(), emb(dark()).numpy()
    assert np.linalg.norm(a) < 0.999 and emb.similarity(a, a)[0] == -1 and emb.similarity(a, b)[0] == -1
    textured = emb(lo + (hi - lo) * (_photo_like(rng) + 1) / 2).numpy()
    assert abs(np.linalg.norm(textured) - 1) < 1e-5 and emb.similarity(textured, textured)[0] > 0.999


@pytest.mark.parametrize("shape,sigma", [((32, 32), 1.0), ((32, 32), 3 ** 0.5), ((32, 32), 8.0), ((12, 20), 2.0)])
def test_blur_is_the_reflect_padded_separable_convolution(shape, sigma):
    """The matrix blur equals torch's own reflect padding and 1-D convolutions, computed in
    float64 as the reference. Bound: two passes of 2r + 1 float32 products and sums with
    weights summing to 1, each rounding by at most eps32 * max|x| (r = ceil(3 sigma))."""
    import math

    import torch.nn.functional as F

    x = torch.randn(7, 1, *shape, generator=torch.Generator().manual_seed(0))
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    ref = F.conv2d(F.pad(x.double(), (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    ref = F.conv2d(F.pad(ref, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    bound = 2 * (2 * r + 1) * torch.finfo(torch.float32).eps * x.abs().max().item()
    assert (_gaussian_blur(x, sigma).double() - ref).abs().max().item() <= bound
    flat = torch.full((2, 1, *shape), 0.3)  # the weights of every output sum to 1
    assert (_gaussian_blur(flat, sigma) - 0.3).abs().max().item() <= bound


def rgb_tensor(img) -> torch.Tensor:
    """A PIL RGB image as the model sees it: [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def test_colour_difference_is_exact_for_a_gain_and_a_hue_turn():
    """The relative chroma difference has closed forms: a gain of 1 + k gives k / (2 + k), a
    rotation of every chroma vector by theta gives sin(theta / 2) (float32 rounding of sums of
    128 terms: 1e-6 absolute)."""
    from pipeline.decide.embeddings import colour_difference

    rng = np.random.default_rng(0)
    c = rng.uniform(-0.5, 0.5, (4, 2, 64)).astype(np.float32)
    flat = c.reshape(4, -1)
    assert colour_difference(flat, 1.12 * flat, 8 / 255) == pytest.approx([0.12 / 2.12] * 4, abs=1e-6)
    theta = np.deg2rad(60)
    turned = np.stack([np.cos(theta) * c[:, 0] - np.sin(theta) * c[:, 1],
                       np.sin(theta) * c[:, 0] + np.cos(theta) * c[:, 1]], 1).reshape(4, -1)
    assert colour_difference(flat, turned, 8 / 255) == pytest.approx([np.sin(theta / 2)] * 4, abs=1e-6)


def test_a_hue_turned_twin_is_not_a_duplicate_but_a_brighter_copy_is():
    """Issue 39: two images that differ only by a hue rotation share every grey layout (grey
    similarity 1) and were joined; the colour check now vetoes them (far below any threshold),
    while a +12% brightness copy still stands at or above the default threshold."""
    from PIL import Image, ImageEnhance

    from tests.planted import scene

    img = scene(np.random.default_rng(3))
    h, s, v = img.convert("HSV").split()
    twin = Image.merge("HSV", (h.point(lambda p: (p + 85) % 256), s, v)).convert("RGB")  # 120 degrees
    bright = ImageEnhance.Brightness(img).enhance(1.12)
    emb = PixelEmbedder(image_side=64, channels=3)
    assert emb.name == "pixel+colour"
    x = emb(torch.cat([rgb_tensor(img), rgb_tensor(twin), rgb_tensor(bright)])).numpy()
    g = emb.grey_dims
    grey = emb.grey_similarity(x[[0, 0], :g], x[[1, 2], :g])
    sim = emb.similarity(x[[0, 0]], x[[1, 2]])
    assert grey[0] > 0.95  # the grey layout alone cannot tell the twin apart
    assert sim[0] < 0.5 and sim[1] >= emb.default_threshold
    # the index's view keeps the copy a candidate at the lowest threshold a run may use
    views = emb.search_view(x)
    assert float(views[0] @ views[2]) >= emb.candidate_threshold(emb.threshold_floor)


def test_grey_images_take_the_grey_path_unchanged():
    """Grey datasets keep today's behaviour exactly: a one-channel embedder's vectors are the
    grey thumbnail alone and its similarity the grey one; RGB without the colour check is that
    same embedder on the images' mean, and a colour embedder refuses grey input."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(-1, 1, (3, 1, 16, 16)).astype(np.float32))
    grey = PixelEmbedder(image_side=16)
    v = grey(x).numpy()
    assert grey.name == "pixel" and v.shape == (3, grey.grey_dims)
    assert np.array_equal(grey.similarity(v[[0, 1]], v[[1, 2]]), grey.grey_similarity(v[[0, 1]], v[[1, 2]]))
    assert make_embedder("pixel", image_side=16).name == "pixel"
    assert make_embedder("pixel", image_side=16, channels=3).name == "pixel+colour"
    rgb = x.expand(-1, 3, -1, -1)
    # the mean of three equal channels is the channel up to float32 rounding of the sum (2 ulp)
    assert torch.allclose(PixelEmbedder(image_side=16, channels=3, colour=False)(rgb), grey(x), rtol=0, atol=4 * 2.0**-23)
    with pytest.raises(ValueError, match="RGB"):
        PixelEmbedder(image_side=16, channels=3)(x)


def test_faint_rgb_images_are_compared_on_an_absolute_scale():
    """Flat and nearly flat RGB fields have no grey structure to correlate (the grey path joins
    them only as exact copies): a flat field and its JPEG copy stand at or above the default
    threshold; the field 12% brighter, 30 grey levels darker, or of another hue does not (a
    brightened flat field cannot be told from another field of that level)."""
    from PIL import Image, ImageEnhance

    from tests.planted import jpeg

    rng = np.random.default_rng(2)
    base = np.clip(np.array([150, 90, 60]) + rng.normal(0, 1.0, (64, 64, 3)), 0, 255).astype(np.uint8)
    field = Image.fromarray(base)
    darker = Image.fromarray(np.clip(base.astype(int) - 30, 0, 255).astype(np.uint8))
    other_hue = Image.fromarray(base[..., ::-1].copy())
    imgs = [field, jpeg(field, 70), ImageEnhance.Brightness(field).enhance(1.12), darker, other_hue]
    emb = PixelEmbedder(image_side=64, channels=3)
    x = emb(torch.cat([rgb_tensor(i) for i in imgs])).numpy()
    sim = emb.similarity(np.repeat(x[:1], 4, 0), x[1:])
    assert sim[0] >= emb.default_threshold and (sim[1:] < emb.threshold_floor).all()


def test_faint_textures_are_aligned_before_they_are_compared():
    """Two faint RGB tiles of one colour and level whose faint textures differ (two tiles of one
    tissue: independent smooth textures of ~1.2 grey levels, ~1.7 levels rms apart) are not
    joined, at the floor threshold either (before: 0.96); a copy of one shifted by 2 pixels (the
    texture moved, not changed) and its JPEG copy are, at the default threshold: the faint
    comparison aligns the textures over the shifts and zooms the grey one tries before it
    measures their difference."""
    from PIL import Image

    from tests.planted import jpeg

    rng = np.random.default_rng(7)

    def tissue() -> np.ndarray:  # a smooth texture of about 1.2 grey levels on an orange-red field
        t = torch.nn.functional.avg_pool2d(torch.from_numpy(rng.normal(0, 1, (1, 1, 72, 72))), 9, 1, 4)[0, 0].numpy()
        return np.clip(np.array([150, 70, 40]) + (1.2 / t.std()) * t[..., None], 0, 255)

    a, b = tissue(), tissue()
    tile = Image.fromarray(a[:64, :64].astype(np.uint8))
    shifted = Image.fromarray(a[2:66, 2:66].astype(np.uint8))  # the same tissue, 2 pixels on
    other = Image.fromarray(b[:64, :64].astype(np.uint8))
    emb = PixelEmbedder(image_side=64, channels=3)
    x = emb(torch.cat([rgb_tensor(i) for i in (tile, shifted, jpeg(tile, 70), other)])).numpy()
    assert (x[:, -1] < emb.faint_contrast).all()  # all four take the faint path
    sim = emb.similarity(np.repeat(x[:1], 3, 0), x[1:])
    assert sim[0] >= emb.default_threshold and sim[1] >= emb.default_threshold
    assert sim[2] < emb.threshold_floor


def test_a_speck_of_light_is_a_feature_not_faint_noise():
    """A near-black tile with a speck of light at one edge (a few pixels of a bright disc's rim,
    as the corners of a fundus photograph have) is not joined to a black tile, though its grey
    standard deviation is under the faint level: a thumbnail point more than 10 levels from the
    mean (what faint noise reaches over 1,024 values) makes it a picture with a feature, compared
    by correlation, by which its JPEG and shifted copies still stand above the default threshold."""
    from PIL import Image

    from tests.planted import jpeg

    rng = np.random.default_rng(3)
    black = np.clip(rng.normal(1, 0.5, (68, 68, 3)), 0, 255)
    speck = black.copy()
    speck[30:32, 62:64] = [200, 130, 60]  # 4 bright pixels at the right edge (before: joined at 0.95)
    tiles = [Image.fromarray(t[:64, :64].astype(np.uint8)) for t in (black, speck)]
    shifted = Image.fromarray(speck[2:66, 2:66].astype(np.uint8))
    emb = PixelEmbedder(image_side=64, channels=3)
    x = emb(torch.cat([rgb_tensor(i) for i in (*tiles, jpeg(tiles[1], 70), shifted)])).numpy()
    assert (x[:2, -1] < emb.faint_contrast).all() and emb.faint(x[:1])[0] and not emb.faint(x[1:2])[0]
    assert emb.similarity(x[:1], x[1:2])[0] < emb.threshold_floor
    assert (emb.similarity(np.repeat(x[1:2], 2, 0), x[2:]) >= emb.default_threshold).all()


def test_chance_draws_of_vetoed_pairs_are_their_similarity_before_the_colour_check():
    """decide/chance.py's draws with the colour check: an agreeing pair's draw is its
    similarity, a vetoed pair's its similarity before the colour check (the grey one, capped by
    the absolute check: for_chance, chance_draws); grey embedders are their own judge."""
    from PIL import Image, ImageEnhance

    from tests.planted import scene

    img = scene(np.random.default_rng(4))
    h, s, v = img.convert("HSV").split()
    twin = Image.merge("HSV", (h.point(lambda p: (p + 85) % 256), s, v)).convert("RGB")
    emb = PixelEmbedder(image_side=64, channels=3)
    x = emb(torch.cat([rgb_tensor(img), rgb_tensor(twin), rgb_tensor(ImageEnhance.Contrast(img).enhance(1.1))])).numpy()
    judge = emb.for_chance()
    drawn = judge.chance_draws(judge.similarity(x[[0, 0]], x[[1, 2]]))
    g = emb.grey_dims
    grey = emb.grey_similarity(x[[0, 0], :g], x[[1, 2], :g])
    assert not emb.smooth(x[:1]).any()  # a scene has detail: its similarity before the colour check is the grey one
    assert drawn[0] == pytest.approx(grey[0], abs=1e-6) and emb.similarity(x[[0]], x[[1]])[0] < grey[0]  # vetoed
    assert drawn[1] == pytest.approx(emb.similarity(x[[0]], x[[2]])[0], abs=1e-6)
    grey_only = PixelEmbedder(image_side=64)
    assert grey_only.for_chance() is grey_only


def test_grey_pictures_decoded_as_rgb_compare_as_grey():
    """memclean dedup decodes RGB: grey pictures (no chroma at all) compare by the grey
    similarity, without the faint or colour checks, to float32 rounding of 1,024-term sums
    (1024 * 2^-24) of the grey embedder's values on the same pictures."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.uniform(-1, 1, (4, 1, 16, 16)).astype(np.float32))
    x[3] = x[2] * 0.01  # faint: the RGB path would compare it absolutely
    grey, rgb = PixelEmbedder(image_side=16), PixelEmbedder(image_side=16, channels=3)
    g, c = grey(x).numpy(), rgb(x.expand(-1, 3, -1, -1)).numpy()
    pairs = ([0, 0, 1, 2], [1, 2, 3, 3])
    assert np.allclose(rgb.similarity(c[pairs[0]], c[pairs[1]]), grey.similarity(g[pairs[0]], g[pairs[1]]),
                       rtol=0, atol=1024 * 2.0**-24)


def _ramp(c0, c1, angle=0.3, n=64):
    """A linear ramp from colour c0 to c1 (8-bit RGB, float: no rounding) across an n x n image."""
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    t = np.clip(((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)) / np.sqrt(0.5) + 0.5, 0, 1)[..., None]
    return np.array(c0, float) * (1 - t) + np.array(c1, float) * t


def _tensor(rgb255: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((rgb255.transpose(2, 0, 1)[None] / 127.5 - 1).astype(np.float32))


def test_absolute_similarity_fits_brightness_and_contrast_exactly():
    """A brightness gain (R, G, B times 1.12) and a contrast change (each channel about the
    mean grey, times 1.12) are a gain k and grey offset o of the 8x8 grey and colour picture,
    which absolute_similarity fits in closed form: the residual is float32 rounding (1e-6 of
    the range against a tolerance of 0.039), so the similarity is 1 to 1e-6."""
    a = _ramp((200, 60, 40), (200, 210, 180))
    m = a.mean(2, keepdims=True).mean()
    emb = PixelEmbedder(image_side=64, channels=3)
    x = emb(torch.cat([_tensor(a), _tensor(1.12 * a), _tensor(m + 1.12 * (a - m))])).numpy()
    assert emb.absolute_similarity(x[[0, 0]], x[[1, 2]]) == pytest.approx([1, 1], abs=1e-6)


def test_absolute_similarity_closed_form_for_a_colour_shift():
    """Two flat pictures of grey level y, one with no chroma and one whose R - G is delta in every
    cell: the best gain would be 0, clipped to 0.8, the offset 0.2 y takes the grey, and the
    residual is 0.8 delta over the 64 of 192 values that are R - G: r = 0.8 delta / sqrt(3), so
    the similarity is 1 - 0.05 (r / tolerance)^2 with tolerance 1.25 * 1 / 32 of the range at
    64 px (float32 rounding: 1e-6)."""
    emb = PixelEmbedder(image_side=64, channels=3)
    g, y, delta = emb.grey_dims, 0.4, 0.1
    a = np.zeros((1, g + 128 + 2), np.float32)
    a[0, -2] = y
    b = a.copy()
    b[0, g:g + 64] = delta  # the R - G thumbnail (the first of the two chroma planes)
    r, tolerance = 0.8 * delta / np.sqrt(3), 1.25 / 32
    assert emb.absolute_similarity(a, b)[0] == pytest.approx(1 - 0.05 * (r / tolerance) ** 2, abs=1e-6)
    far = b.copy()
    far[0, g:g + 64] = 1.0  # far beyond the tolerance: bounded above -1, still a draw of chance
    assert emb.absolute_similarity(a, far)[0] == pytest.approx(-1 + 1e-3)


def test_smooth_fields_of_like_colours_are_apart_but_their_copies_join():
    """Normalised correlation cannot tell two smooth fields of like colours apart (the ramps
    below: grey similarity 1, and the colour check passes); the absolute check can. The same
    ramp brightened, its contrast raised or shifted by 2 px stays at or above the default
    threshold."""
    emb = PixelEmbedder(image_side=64, channels=3)
    a = _ramp((200, 60, 40), (240, 240, 200))
    m = a.mean()
    shifted = np.concatenate([a[:, :1].repeat(2, 1), a[:, :-2]], 1)
    other = _ramp((200, 60, 80), (240, 240, 200))  # the dark end bluer by 40 levels
    imgs = [np.round(i) for i in (a, np.clip(1.12 * a, 0, 255), np.clip(m + 1.12 * (a - m), 0, 255), shifted, other)]
    x = emb(torch.cat([_tensor(i) for i in imgs])).numpy()
    sim = emb.similarity(np.repeat(x[:1], 4, 0), x[1:])
    g = emb.grey_dims
    assert emb.grey_similarity(x[:1, :g], x[4:, :g])[0] > 0.999 and emb.colour_similarity(x[:1, g:], x[4:, g:])[0] == 1
    assert (sim[:3] >= emb.default_threshold).all() and sim[3] < emb.default_threshold
