"""Image sources, decoding and preparation for scoring.

An input is an `Item` (a stable id, a display path and a way to read its bytes). Decoding turns
the bytes into the model's channels and size, in [-1, 1]; anything that cannot be decoded
becomes a rejection with a reason, never a crash and never a silent drop.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


class Rejected(Exception):
    """An input that cannot be scored; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # e.g. empty_file, corrupt_image, not_an_image
        self.detail = detail  # the underlying error, for people


@dataclass(frozen=True)
class Item:
    """One input, not yet read."""

    id: str  # stable and unique within a source (relative path for folders)
    path: str  # where it came from, for people
    read: Callable[[], bytes]  # the file's bytes


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes: channel count and (H, W)."""

    channels: int  # 1 (L), 3 (RGB) or 4 (RGBA)
    size: tuple[int, int]  # (H, W)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3, 4):
            raise ValueError(f"models with {self.channels} channels are not supported: 1, 3 or 4")


@dataclass
class Decoded:
    """An item after reading and decoding: pixels, or the reason it was rejected."""

    item: Item
    sha256: str | None  # of the file bytes; None when they could not be read
    pixels: torch.Tensor | None  # [C, H, W] float32 in [-1, 1]
    reject_reason: str | None = None
    reject_detail: str = ""


def folder_items(root: str | os.PathLike) -> Iterator[Item]:
    """Every image file below `root`, recursively, in sorted order (ids are relative paths)."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                rel = path.relative_to(root).as_posix()
                yield Item(rel, str(path), path.read_bytes)


def discover(path: str | os.PathLike) -> Iterator[Item]:
    """The items of a data source; `path` is a folder of images."""
    p = Path(path)
    if p.is_dir():
        return folder_items(p)
    raise ValueError(f"data path {str(p)!r} is not a folder of images")


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to L / RGB / RGBA deterministically; alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_high_depth_to_uint8(img), "L")
    if channels == 4:
        return img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float grey to 8 bits, by the range the values fit in.

    I;16: full scale 65535. I and F: the smallest of 1 (float only), 255, 65535 that holds the
    maximum, else the maximum itself; negative values clip to 0.
    """
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        full = 65535.0
    else:
        peak = float(arr.max(initial=0.0))
        scales = ([1.0] if img.mode == "F" else []) + [255.0, 65535.0]
        full = next((s for s in scales if peak <= s), peak)
    return np.clip(np.round(arr / full * 255.0), 0, 255).astype(np.uint8)


def center_crop_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the largest centred box of the target aspect ratio, then resize to (H, W)."""
    H, W = size
    w, h = img.size
    if w * H > h * W:  # too wide
        cw, ch = max(1, round(h * W / H)), h
    else:
        cw, ch = w, max(1, round(w * H / W))
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    return img.resize((W, H), Image.Resampling.BILINEAR) if (cw, ch) != (W, H) else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 image -> [C, H, W] float32 in [-1, 1] as x / 127.5 - 1."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


def decode_image(data: bytes, spec: ImageSpec) -> torch.Tensor:
    """File bytes -> [C, H, W] in [-1, 1]; raises Rejected with the reason."""
    if not data:
        raise Rejected("empty_file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)  # first frame of animations
            img.load()
            img = ImageOps.exif_transpose(img)
            img = to_model_mode(img, spec.channels)
    except Image.UnidentifiedImageError as e:
        raise Rejected("not_an_image", str(e)) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise Rejected("corrupt_image", str(e)) from e
    return to_tensor(center_crop_resize(img, spec.size))


def decode_item(item: Item, spec: ImageSpec) -> Decoded:
    """Read and decode one item; never raises for bad input."""
    try:
        data = item.read()
    except OSError as e:
        return Decoded(item, None, None, "unreadable", str(e))
    sha = hashlib.sha256(data).hexdigest()
    try:
        return Decoded(item, sha, decode_image(data, spec))
    except Rejected as e:
        return Decoded(item, sha, None, e.reason, e.detail)


def batched(items: Iterable[Item], spec: ImageSpec, size: int) -> Iterator[list[Decoded]]:
    """Decode items lazily, `size` at a time: memory holds one batch, not the dataset."""
    batch: list[Decoded] = []
    for item in items:
        batch.append(decode_item(item, spec))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
