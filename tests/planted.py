"""A generated image set with planted exact and near duplicates, for dedup tests."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from pipeline.decide.embeddings import PixelEmbedder
from pipeline.io.data import ImageSpec, batched, discover


def pink_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise with a natural-image 1/f amplitude spectrum, unit std: [size, size]."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / np.maximum(f, 1 / size)
    field = np.fft.ifft2(spectrum).real
    return (field - field.mean()) / field.std()


def scene(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A random RGB scene with natural statistics: coloured blobs over a gradient, 1/f texture."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    img += rng.uniform(0, 1, 3) * (1 - yy[..., None]) + rng.uniform(0, 1, 3) * yy[..., None]
    for _ in range(rng.integers(3, 8)):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
        img += blob[..., None] * rng.uniform(-1, 1, 3)
    img += 0.3 * pink_noise(rng, size)[..., None] * rng.uniform(0.5, 1, 3)
    img = (img - img.min()) / (img.max() - img.min() + 1e-9)
    return Image.fromarray(np.round(img * 255).astype(np.uint8), "RGB")


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def variant(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One near duplicate of `img` within the documented tolerances."""
    w, h = img.size
    if kind == "jpeg":
        return jpeg(img, int(rng.integers(70, 95)))
    if kind == "brightness_contrast":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
        return ImageEnhance.Contrast(img).enhance(rng.uniform(0.9, 1.1))
    if kind == "crop_resize":
        c = rng.uniform(0.0, 0.05)
        box = (round(w * c / 2), round(h * c / 2), w - round(w * c / 2), h - round(h * c / 2))
        return img.crop(box).resize((w, h), Image.Resampling.BILINEAR)
    if kind == "shift":
        dx, dy = int(rng.choice([-2, 2])), int(rng.choice([-2, 2]))  # translate, edges replicated
        arr = np.pad(np.asarray(img), ((2, 2), (2, 2), (0, 0)), mode="edge")
        return Image.fromarray(arr[2 - dy:2 - dy + h, 2 - dx:2 - dx + w])
    if kind == "flip":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    raise ValueError(kind)


NEAR_KINDS = ("jpeg", "brightness_contrast", "crop_resize", "shift")


def planted_set(root, n_unique: int = 200, n_groups: int = 20, seed: int = 0, kinds=NEAR_KINDS):
    """Write PNGs to `root`; returns {file name: group} (group -1 = unique)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n_unique):
        scene(rng).save(root / f"u{i:04d}.png")
        truth[f"u{i:04d}.png"] = -1
    for g in range(n_groups):
        base = scene(rng)
        base.save(root / f"g{g:03d}_orig.png")
        truth[f"g{g:03d}_orig.png"] = g
        base.save(root / f"g{g:03d}_exact.png")
        truth[f"g{g:03d}_exact.png"] = g
        for kind in kinds:
            variant(base, kind, rng).save(root / f"g{g:03d}_{kind}.png")
            truth[f"g{g:03d}_{kind}.png"] = g
    return truth


def embed_folder(root: Path, size=(64, 64), flip=False):
    """Decode a folder at `size` and embed it with the pixel embedder: (decoded, vectors, mirrored vectors, embedder)."""
    ds = [d for b in batched(discover(root), ImageSpec(3, size), 64) for d in b]
    x = torch.stack([d.pixels for d in ds])
    emb = PixelEmbedder(image_side=min(size))
    flipped = emb(x, flip=True).numpy() if flip else None
    return ds, emb(x).numpy(), flipped, emb
