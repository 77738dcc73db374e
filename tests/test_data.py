"""Decoding and preparation: modes, EXIF, alpha, crop and resize, rejections."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (ImageSpec, Item, Rejected, center_crop_resize, decode_image, decode_item,
                           discover, to_model_mode)


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_uint8_maps_to_minus_one_one():
    arr = np.array([[0, 255], [127, 128]], dtype=np.uint8)
    x = decode_image(png_bytes(Image.fromarray(arr, "L")), ImageSpec(1, (2, 2)))
    assert x.shape == (1, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(arr, dtype=torch.float32) / 127.5 - 1)


def test_center_crop_then_resize():
    arr = np.zeros((4, 8), dtype=np.uint8)
    arr[:, 2:6] = 255  # the centred 4x4 square is white, the sides black
    out = center_crop_resize(Image.fromarray(arr, "L"), (4, 4))
    assert np.asarray(out).min() == 255
    assert center_crop_resize(Image.fromarray(arr, "L"), (2, 2)).size == (2, 2)
    tall = center_crop_resize(Image.new("L", (3, 9)), (2, 4))
    assert tall.size == (4, 2)  # PIL size is (W, H)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "1", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_every_mode_converts(mode, channels):
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray(np.full((5, 5), 30000, dtype=np.uint16))  # mode I;16
        img = img if mode == "I;16" else img.convert(mode)
    else:
        img = Image.new("RGB", (5, 5), (200, 100, 50)).convert(mode)
    assert img.mode == mode
    out = to_model_mode(img, channels)
    assert out.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    x = decode_image(png_bytes(img), ImageSpec(3, (2, 2)))
    assert torch.all(x == 1.0)


@pytest.mark.parametrize("values,mode,expected", [
    (np.full((2, 2), 65535, dtype=np.uint16), None, 255),  # I;16 full scale
    (np.full((2, 2), 32768, dtype=np.uint16), None, 128),
    (np.full((2, 2), 200, dtype=np.int32), "I", 200),  # 8-bit values in a 32-bit image
    (np.full((2, 2), 0.5, dtype=np.float32), "F", 128),  # floats in [0, 1]
])
def test_high_bit_depths_scale_by_their_range(values, mode, expected):
    img = Image.fromarray(values) if mode is None else Image.fromarray(values, mode)
    assert np.asarray(to_model_mode(img, 1)).max() == expected


def test_exif_orientation_is_applied():
    arr = np.zeros((2, 4, 3), dtype=np.uint8)
    arr[:, :2] = 255  # left half white
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    x = decode_image(png_bytes(img, "PNG", exif=exif.tobytes()), ImageSpec(1, (4, 2)))
    assert x.shape == (1, 4, 2)
    assert torch.all(x[0, :2] == 1.0) and torch.all(x[0, 2:] == -1.0)  # white on top after rotation


def test_gif_first_frame():
    frames = [Image.new("L", (4, 4), v) for v in (255, 0)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert torch.all(decode_image(buf.getvalue(), ImageSpec(1, (4, 4))) == 1.0)


@pytest.mark.parametrize("data,reason", [(b"", "empty_file"), (b"hello", "not_an_image"),
                                         (None, "corrupt_image")])
def test_rejections(data, reason):
    if data is None:
        data = png_bytes(Image.new("RGB", (64, 64)))[:60]  # truncated
    with pytest.raises(Rejected) as e:
        decode_image(data, ImageSpec(1, (8, 8)))
    assert e.value.reason == reason


def test_unreadable_item_is_rejected_not_raised():
    def fail():
        raise PermissionError("denied")

    d = decode_item(Item("a", "a.png", fail), ImageSpec(1, (8, 8)))
    assert d.reject_reason == "unreadable" and d.pixels is None and d.sha256 is None


def test_folder_discovery_is_recursive_sorted_and_filters_suffixes(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.webp", "notes.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [i.id for i in discover(tmp_path)] == ["a.JPG", "b.png", "sub/c.webp"]
    with pytest.raises(ValueError, match="not a folder"):
        list(discover(tmp_path / "missing"))
