"""Vectors for duplicate search, compared by cosine similarity (all are L2-normalised).

Embedders take images as the model sees them (x: [B, C, H, W] in the model's data range: [-1, 1]
for VP/DDPM models, [0, 1] for VE; without a model, [-1, 1]) and return [B, d] float32 unit
vectors. They are chosen by name from EMBEDDERS:
    pixel             model-free: grey, resized to 32x32, blurred (sigma 1 px), mean removed.
                      Its similarity is the correlation of two thumbnails and of their detail,
                      aligned over zooms of +-5% and shifts of up to 1/32 of the image or one
                      image pixel, whichever is larger: invariant to brightness and contrast,
                      tolerant of JPEG, blur, rescaling, shifts and crops of up to 5%; flat
                      images (under one grey level of std) join only as exact copies.
    unet              the diffusion model's own mid-block features at t = 0.5, pooled.
    torchscript:PATH  a user model from a local TorchScript file (e.g. SSCD copy-detection
                      weights): RGB in [0, 1], ImageNet-normalised, resized to --embed-size.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.score.models import usable_device

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Embedder(Protocol):
    name: str  # recorded in the manifest; --against requires the same one
    default_threshold: float  # similarity at or above which two images are duplicates, when chance cannot be measured
    threshold_floor: float  # --dup-threshold auto never goes below it (decide/chance.py)

    def __call__(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """x: [B, C, H, W] in the model's data range -> [B, d] unit vectors (of the mirrored image if flip)."""

    def search_view(self, v: np.ndarray) -> np.ndarray:
        """The vectors the FAISS index holds (unit, inner product)."""

    def candidate_threshold(self, threshold: float) -> float:
        """Index similarity above which a pair is checked with `similarity`."""

    def similarity(self, a: np.ndarray, b: np.ndarray, floor: float | None = None) -> np.ndarray:
        """Row-wise similarity of embeddings: [n, d], [n, d] -> [n]. Values below `floor` need
        only be below it (an embedder may stop refining a pair it has ruled out)."""


class CosineSimilarity:
    """The default: the index holds the embeddings, similarity is their inner product."""

    def search_view(self, v: np.ndarray) -> np.ndarray:
        return v

    def candidate_threshold(self, threshold: float) -> float:
        return threshold

    def similarity(self, a: np.ndarray, b: np.ndarray, floor: float | None = None) -> np.ndarray:
        return np.einsum("nd,nd->n", a, b)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v.flatten(1).to(torch.float32), dim=1)


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """[n, n] matrix of a 1-D Gaussian blur with reflect padding (radius ceil(3 sigma), at most
    n - 1 as reflect padding allows): row i holds the weights output i takes from each input.
    Made once per (n, sigma): every blur of a run uses the same few."""
    radius = min(max(1, math.ceil(3 * sigma)), n - 1)
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for o in range(-radius, radius + 1):
            j = abs(i + o)  # reflect at both edges, the edge pixel not repeated (torch's "reflect")
            j = 2 * (n - 1) - j if j > n - 1 else j
            m[i, j] += k[o + radius]
    return m


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding: [B, 1, H, W] -> same, as two small
    matrix products (M_H x M_W^T). A convolution computes the same sums, but on the CPU its
    speed and scratch memory depend on the batch size: 2,048 thumbnails took 170 MB of scratch
    and 5x the time of 256."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    mh = _blur_matrix(h, sigma).to(x.dtype).to(x.device)
    mw = mh if w == h else _blur_matrix(w, sigma).to(x.dtype).to(x.device)
    return mh @ x @ mw.T


class PixelEmbedder:
    """A blurred, mean-removed 32x32 grey thumbnail, compared by aligned correlation at two scales.

    The index holds a blurrier view (sigma 2) that finds candidates robustly; each candidate
    pair is then compared over zooms of 1/0.95, 1 and 0.95 (crops of up to 5%) and shifts of up
    to max_shift thumbnail pixels (1, or one image pixel when the images are smaller than the
    thumbnail), twice: the thumbnails' correlation, and the correlation of their detail (the
    thumbnail less its blur of sigma 2, in image pixels for images under 32 pixels). Its similarity is min(thumbnail correlation, 1 - (1 -
    detail correlation) / 2): two photos that share only a smooth layout (sky, a dark vignette)
    correlate as thumbnails but not in detail. An image whose thumbnail varies by less than
    min_levels grey levels (std) has no structure to compare: its vector is shorter than 1 in
    proportion, and it joins others only as an exact copy (equal pixels).
    """

    name = "pixel"
    default_threshold = 0.95
    threshold_floor = 0.9  # near copies on photos reach 0.9-0.95 (benchmarks/dup_threshold.py)
    zooms = (1.0, 0.95, 1 / 0.95)  # scales tried about the centre: crops of up to 5% per side total
    detail_weight = 0.5  # similarity = min(correlation, 1 - (1 - detail correlation) * weight)

    def __init__(self, size: int = 32, sigma: float = 1.0, search_sigma: float = 2.0,
                 image_side: int | None = None, data_range: tuple[float, float] = (-1.0, 1.0),
                 min_levels: float = 1.0):
        self.size = size  # thumbnail side
        self.sigma = sigma  # blur of the stored thumbnail, in thumbnail pixels
        self.search_sigma = search_sigma  # blur of the indexed view
        # largest shift tried, in thumbnail pixels: one image pixel for images under `size`
        self.max_shift = max(1, math.ceil(size / image_side)) if image_side else 1
        # detail = thumbnail less this blur: search_sigma, in image pixels for images under `size`
        self.detail_sigma = min(search_sigma * self.max_shift, size / 4)
        # thumbnail std below which an image counts as flat: min_levels 8-bit grey levels
        self.flat_std = min_levels * (data_range[1] - data_range[0]) / 255

    def search_view(self, v: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """The stored thumbnails blurred further to search_sigma and sampled at every second
        pixel (16x16, 256 values), in chunks (bounded memory). At sigma 2 the blur passes
        exp(-2 pi^2 sigma^2 f^2) < 1% of the amplitude at the new Nyquist frequency f = 1/4, so
        the samples keep the view's inner products and the index holds a quarter of the data."""
        extra = math.sqrt(self.search_sigma**2 - self.sigma**2)
        step = 2 if self.search_sigma >= 2 else 1
        out = np.empty((len(v), (self.size // step) ** 2), np.float32)
        for s in range(0, len(v), chunk):
            # a copy of the chunk: v may be a read-only memory map
            t = torch.from_numpy(np.array(v[s:s + chunk], dtype=np.float32)).view(-1, 1, self.size, self.size)
            blurred = _gaussian_blur(t, extra)
            # the centre of each 2x2 block (bilinear at half-pixel offsets: the 2x2 mean)
            out[s:s + chunk] = _unit(F.avg_pool2d(blurred, step) if step > 1 else blurred).numpy()
        return out

    def candidate_threshold(self, threshold: float) -> float:
        # the sigma-2 views of pairs at or above threshold correlate at >= 1 - 2 * max_shift * (1 - t)
        # on photos, scenes and the demo digits (benchmarks/near_duplicates.py); 3x leaves a margin
        return 1 - 3 * self.max_shift * (1 - threshold)

    def _shifted_correlation(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """max over shifts of the correlation of a and b over their overlap: [n, s, s] -> [n]."""
        s = self.size
        best = torch.full((len(a),), -1.0)
        shifts = range(-self.max_shift, self.max_shift + 1)
        for dy in shifts:
            for dx in shifts:
                pa = a[:, max(dy, 0):s + min(dy, 0), max(dx, 0):s + min(dx, 0)].flatten(1)
                pb = b[:, max(-dy, 0):s + min(-dy, 0), max(-dx, 0):s + min(-dx, 0)].flatten(1)
                pa, pb = pa - pa.mean(1, keepdim=True), pb - pb.mean(1, keepdim=True)
                r = (pa * pb).sum(1) / (pa.norm(dim=1) * pb.norm(dim=1)).clamp_min(1e-12)
                best = torch.maximum(best, r)
        return best

    def similarity(self, a: np.ndarray, b: np.ndarray, floor: float | None = None) -> np.ndarray:
        n, s = len(a), self.size
        a = torch.from_numpy(np.asarray(a, np.float32)).view(n, 1, s, s)
        b = torch.from_numpy(np.asarray(b, np.float32)).view(n, 1, s, s)
        flat = (a.flatten(1).norm(dim=1) < 0.999) | (b.flatten(1).norm(dim=1) < 0.999)
        zoomed = [b if z == 1 else _zoom(b, z) for z in self.zooms]
        full = torch.full((n,), -1.0)
        for bz in zoomed:
            full = torch.maximum(full, self._shifted_correlation(a[:, 0], bz[:, 0]))
        # the detail term only where the thumbnails alone do not rule the pair out
        todo = ~flat if floor is None else ~flat & (full >= floor)
        detail = torch.full((n,), -1.0)
        if todo.any():
            da = (a - _gaussian_blur(a, self.detail_sigma))[todo, 0]
            best = torch.full((int(todo.sum()),), -1.0)
            for bz in zoomed:
                bz = bz[todo]
                best = torch.maximum(best, self._shifted_correlation(da, (bz - _gaussian_blur(bz, self.detail_sigma))[:, 0]))
            detail[todo] = best
        sim = torch.where(todo, torch.minimum(full, 1 - (1 - detail) * self.detail_weight), full)
        return torch.where(flat, torch.full_like(sim, -1.0), sim).numpy()

    def __call__(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        grey = x.to(torch.float32).mean(1, keepdim=True)
        grey = F.interpolate(grey, size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)
        grey = _gaussian_blur(grey, self.sigma)
        if flip:
            grey = grey.flip(-1)
        v = grey.flatten(1)
        v = v - v.mean(1, keepdim=True)
        # unit length, or std / flat_std < 1 for a flat image (similarity reads it as flat)
        floor = self.flat_std * math.sqrt(v.shape[1])
        return v / v.norm(dim=1, keepdim=True).clamp_min(floor)


def _zoom(t: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, 1, H, W] resampled about the centre: content grows by 1/scale (border replicated)."""
    theta = torch.tensor([[scale, 0.0, 0.0], [0.0, scale, 0.0]], dtype=t.dtype).expand(len(t), 2, 3)
    grid = F.affine_grid(theta, list(t.shape), align_corners=False)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)


class UNetEmbedder(CosineSimilarity):
    """Mid-block features of the diffusion UNet at a fixed noise level (no noise drawn)."""

    name = "unet"
    default_threshold = 0.95
    threshold_floor = 0.9  # not measured against copies: the pixel embedder's

    def __init__(self, score_fn, t: float = 0.5, prepare=None):
        self.score_fn = score_fn  # a DiffusersScore: its UNet and schedule
        self.t = torch.tensor(t, dtype=torch.float64)  # the diffusion time features are taken at
        self.prepare = prepare or (lambda x: x)  # images -> what the UNet takes (a latent pipeline's latent)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        unet, schedule = self.score_fn.unet, self.score_fn.schedule
        if flip:
            x = x.flip(-1)
        x = self.prepare(x)
        features: list[torch.Tensor] = []
        hook = unet.mid_block.register_forward_hook(lambda m, i, o: features.append(o))
        try:
            scale = schedule.abar(self.t).sqrt() if schedule.kind == "vp" else torch.tensor(1.0)
            timestep = schedule.timestep(self.t).to(torch.float32).expand(x.shape[0]).to(x.device)
            unet((scale.to(x.dtype) * x).to(self.score_fn.dtype), timestep)
        finally:
            hook.remove()
        f = features[0]
        return _unit(torch.cat([f.mean((2, 3)), f.flatten(2).std(2)], 1))


class TorchScriptEmbedder(CosineSimilarity):
    """A local TorchScript model (e.g. SSCD): RGB [0, 1], ImageNet-normalised, resized."""

    default_threshold = 0.75  # SSCD's suggested copy-detection similarity
    threshold_floor = 0.6  # not measured here: below SSCD's 0.75, above what unrelated images reach

    def __init__(self, path: str, size: int = 224, device: str | torch.device = "cpu",
                 data_range: tuple[float, float] = (-1.0, 1.0)):
        import os

        if not os.path.isfile(path):
            raise ValueError(f"embedder file {path!r} not found: expected a TorchScript model")
        try:
            self.model = torch.jit.load(path, map_location=device).eval()
        except Exception as e:
            raise ValueError(f"cannot load {path!r} as TorchScript: {e}") from e
        self.name = f"torchscript:{path}"
        self.size = size  # input side length the model expects
        self.data_range = data_range  # the range of the images it is given (the scoring model's)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        lo, hi = self.data_range
        rgb = ((x.to(torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        rgb = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb[:, :3]
        rgb = F.interpolate(rgb, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if flip:
            rgb = rgb.flip(-1)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return _unit(self.model((rgb - mean) / std))


EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    "pixel": lambda model=None, image_side=None, **kw: PixelEmbedder(
        image_side=min(model.sample_size) if model else image_side,
        data_range=tuple(model.data_range) if model else (-1.0, 1.0)),
    "unet": lambda model=None, **kw: UNetEmbedder(model.score_fn, prepare=model.prepare),
    "torchscript": lambda model=None, path="", size=224, device="cpu", **kw: TorchScriptEmbedder(
        path, size, device, model.data_range if model else (-1.0, 1.0)),
}


def make_embedder(spec: str, model=None, size: int = 224, device: str | torch.device = "cpu",
                  image_side: int | None = None) -> Embedder:
    """'pixel', 'unet' or 'torchscript:PATH' -> an embedder; image_side: the side of the images it
    is given when there is no model (memclean dedup)."""
    name, _, path = spec.partition(":")
    if name not in EMBEDDERS:
        raise ValueError(f"embedder {spec!r} is not one of pixel, unet, torchscript:PATH")
    if name == "torchscript" and not path:
        raise ValueError("the torchscript embedder needs a file: --embedder torchscript:PATH")
    device = usable_device(device)
    return EMBEDDERS[name](model=model, path=path, size=size, device=device, image_side=image_side)
