"""An image's complexity: its lossless code length, the confound a likelihood carries.

The log-likelihood of deep generative models tracks how simple an image is: plain images (sky,
a studio backdrop, a black border) score high whether or not the model saw them (Serra et al.,
ICLR 2020, who correct log p by a lossless compressor's code length; Kamkari et al., ICML 2024).
complexity(x) = the length, in nats, of the image as the model sees it (its channels and size,
8 bits a value) encoded by libwebp's lossless coder through Pillow: a strong general-purpose
lossless image coder, deterministic for a given libwebp. `CODEC` names the coder and versions,
recorded with every score.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, features

WEBP = {"format": "WEBP", "lossless": True, "quality": 100, "method": 4, "exact": True}  # Pillow's save options


def codec() -> str:
    """The coder and its versions, e.g. 'webp-lossless q100 m4 (libwebp 1.5.0, Pillow 11.1.0)'."""
    import PIL

    return f"webp-lossless q{WEBP['quality']} m{WEBP['method']} (libwebp {features.version('webp')}, Pillow {PIL.__version__})"


def to_uint8(pixels: torch.Tensor, data_range: tuple[float, float]) -> np.ndarray:
    """[C, H, W] in the data range (data.to_tensor's output) -> [H, W, C] uint8, exactly its input."""
    lo, hi = data_range
    arr = np.rint((pixels.detach().cpu().double().numpy() - lo) * (255 / (hi - lo)))
    return np.clip(arr, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def complexity(pixels: torch.Tensor, data_range: tuple[float, float]) -> float:
    """The lossless WebP code length of an image, in nats: [C, H, W] in data_range -> float."""
    if not features.check("webp"):
        raise RuntimeError("this Pillow has no WebP support: the complexity score needs it (pip install pillow)")
    arr = to_uint8(pixels, data_range)
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, **WEBP)
    return buf.tell() * 8 * math.log(2)
