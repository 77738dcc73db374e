"""Complexity: the lossless WebP code length of the image the model sees."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io.data import to_tensor
from pipeline.score.complexity import codec, complexity, to_uint8


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_the_pixels_go_back_to_their_bytes_exactly(data_range):
    """to_uint8 inverts data.to_tensor for every 8-bit value, in either data range."""
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([arr, arr.T, 255 - arr], -1))
    assert np.array_equal(to_uint8(to_tensor(img, data_range), data_range), np.asarray(img))


def test_the_code_length_is_lossless_and_orders_plain_below_textured():
    """The length is 8 ln 2 nats a byte of WebP that decodes to the very pixels; a flat image
    codes shorter than a smooth gradient, which codes shorter than noise."""
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 128, np.uint8)
    ramp = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 32, 3)).copy()
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    lengths = []
    for arr in (flat, ramp, noise):
        x = to_tensor(Image.fromarray(arr))
        nats = complexity(x, (-1.0, 1.0))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "WEBP", lossless=True, quality=100, method=4, exact=True)
        assert nats == buf.tell() * 8 * math.log(2)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), arr)
        lengths.append(nats)
    assert lengths[0] < lengths[1] < lengths[2]
    assert "libwebp" in codec() and "Pillow" in codec()
    grey = to_tensor(Image.fromarray(noise[:, :, 0]))  # one channel works the same way
    assert complexity(grey, (-1.0, 1.0)) > 0 and complexity(torch.zeros(1, 8, 8), (-1.0, 1.0)) > 0
