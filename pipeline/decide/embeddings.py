"""Vectors for duplicate search, compared by cosine similarity (all are L2-normalised).

Embedders take images as the model sees them (x: [B, C, H, W] in the model's data range: [-1, 1]
for VP/DDPM models, [0, 1] for VE; without a model, [-1, 1]) and return [B, d] float32 unit
vectors. They are chosen by name from EMBEDDERS:
    pixel             model-free: grey, resized to 32x32, blurred (sigma 1 px), mean removed;
                      for RGB images also their colours and tone (recorded as pixel+colour).
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

import copy
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
VETOED = 4.0  # for_chance: a vetoed pair's similarity is its grey one less this (below any agreed pair's)
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
    """A blurred, mean-removed 32x32 grey thumbnail, compared by aligned correlation at two scales,
    and for RGB images their colours and tone beside it.

    The index holds a blurrier view (sigma 2) that finds candidates robustly; each candidate
    pair is then compared over zooms of 1/0.95, 1 and 0.95 (crops of up to 5%) and shifts of up
    to max_shift thumbnail pixels (1, or one image pixel when the images are smaller than the
    thumbnail), twice: the thumbnails' correlation, and the correlation of their detail (the
    thumbnail less its blur of sigma 2, in image pixels for images under 32 pixels). Its similarity is min(thumbnail correlation, 1 - (1 -
    detail correlation) / 2): two photos that share only a smooth layout (sky, a dark vignette)
    correlate as thumbnails but not in detail. An image whose thumbnail varies by less than
    min_levels grey levels (std) has no structure to compare: its vector is shorter than 1 in
    proportion, and it joins others only as an exact copy (equal pixels).

    RGB images (channels=3) carry more: an 8x8 thumbnail of their opponent colours (R - G and
    (R + G) / 2 - B, blurred by one of its pixels) and the grey thumbnail's mean and standard
    deviation, the tone that normalising takes away. A pair's similarity is then at most its
    colour and tone check (colour_similarity): chroma that differ by more than colour_tolerance
    of their size, means more than mean_tolerance of the range apart, or contrasts more than a
    factor contrast_tolerance apart veto it, whatever its grey layout. RGB pairs are also compared
    on an absolute scale (absolute_similarity: their 8x8 grey and colour pictures, once a
    brightness or contrast change is fitted, within what the largest shift tried moves a ramp),
    which caps their similarity: normalised correlation cannot tell two smooth fields of like
    colours apart. Two RGB images
    with almost no grey structure (flat, or nearly) are compared on an absolute scale
    (faint_similarity: their faint textures aligned, then differenced) instead of by normalised
    correlation, which magnifies their noise; a picture with a feature (a speck of light) is not
    faint, whatever its standard deviation. The index's view holds the colours too, so that candidates are look-alikes in colour
    as well as in layout. Grey images (channels=1) are compared exactly as they always were, and
    so are two grey pictures decoded as RGB (no chroma at all: memclean dedup decodes RGB).
    """

    default_threshold = 0.95
    threshold_floor = 0.9  # near copies on photos reach 0.9-0.95 (benchmarks/dup_threshold.py)
    zooms = (1.0, 0.95, 1 / 0.95)  # scales tried about the centre: crops of up to 5% per side total
    detail_weight = 0.5  # similarity = min(correlation, 1 - (1 - detail correlation) * weight)
    # the colour check (RGB): tolerances of the edits a near copy may carry, measured on planted
    # copies (benchmarks/colour_duplicates.py: JPEG, brightness +12%, blur, rescale, shift, crop
    # reach a chroma difference of 0.16 at most, a gain of 1.25 gives 0.11, a hue turned by 25 degrees 0.22)
    colour_size = 8  # side of the colour thumbnail
    colour_tolerance = 0.2  # relative chroma difference a near copy may have (colour_difference)
    chroma_floor = 8 / 255  # chroma differences are relative to the colours' size, at least this (8 levels)
    mean_tolerance = 0.25  # difference of mean grey level a near copy may have (share of the range)
    contrast_tolerance = 2.0  # factor of grey standard deviation a near copy may have
    contrast_floor = 2 / 255  # standard deviations below this count as this (two levels)
    faint_contrast = 3 / 255  # RGB images whose grey std is under this (3 levels) are compared absolutely,
    # when no point of their thumbnail is further than faint_peak from its mean: noise of
    # faint_contrast over the thumbnail's 1,024 values peaks at about 3.3 times it (10 levels); a
    # point beyond is a feature (a speck of light, a star), which correlation compares faithfully
    faint_peak = 10 / 255
    # faint images whose grey structures, aligned over the zooms and shifts tried, differ by this
    # (rms) or by this at their largest difference stand at the default threshold: the worst
    # planted copies of faint tiles (benchmarks/colour_duplicates.py, photographs at full and half
    # size, smooth fields) reach 0.62 levels rms (JPEG) and 4.8 at a point (a 5% crop of a star
    # field); a quarter more
    faint_levels = 0.8 / 255
    faint_peak_levels = 6 / 255
    faint_mean_levels = 2 / 255  # and so do faint images whose mean grey levels are this far apart
    colour_share = 0.25  # the colours' share of the index view's inner product (search_view)
    # the absolute check (RGB, absolute_similarity): a near copy's 8x8 grey and colour picture,
    # once a gain and grey offset (a brightness or contrast change) are fitted, differs by at most
    # what the largest shift tried moves a ramp across the whole range: max_shift / size of the
    # range, with this margin
    absolute_margin = 1.25
    gain_range = (0.8, 1.25)  # the brightness or contrast gains fitted
    smooth_detail = 0.1  # pictures whose detail is under this share of their structure are smooth
    chance = False  # similarities as chance's draws (for_chance)

    def __init__(self, size: int = 32, sigma: float = 1.0, search_sigma: float = 2.0,
                 image_side: int | None = None, data_range: tuple[float, float] = (-1.0, 1.0),
                 min_levels: float = 1.0, channels: int = 1, colour: bool = True):
        self.size = size  # thumbnail side
        self.data_range = data_range
        self.colour = colour and channels == 3  # RGB images get the colour check; grey ones never
        # recorded in the manifest; --against requires the same one (the vectors differ)
        self.name = "pixel+colour" if self.colour else "pixel"
        self.sigma = sigma  # blur of the stored thumbnail, in thumbnail pixels
        self.search_sigma = search_sigma  # blur of the indexed view
        # largest shift tried, in thumbnail pixels: one image pixel for images under `size`
        self.max_shift = max(1, math.ceil(size / image_side)) if image_side else 1
        # detail = thumbnail less this blur: search_sigma, in image pixels for images under `size`
        self.detail_sigma = min(search_sigma * self.max_shift, size / 4)
        # thumbnail std below which an image counts as flat: min_levels 8-bit grey levels
        self.flat_std = min_levels * (data_range[1] - data_range[0]) / 255

    @property
    def grey_dims(self) -> int:
        """The thumbnail's share of a vector: the rest, when there is a rest, is the colour."""
        return self.size * self.size

    def search_view(self, v: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """The stored thumbnails blurred further to search_sigma and sampled at every second
        pixel (16x16, 256 values), in chunks (bounded memory). At sigma 2 the blur passes
        exp(-2 pi^2 sigma^2 f^2) < 1% of the amplitude at the new Nyquist frequency f = 1/4, so
        the samples keep the view's inner products and the index holds a quarter of the data.
        RGB vectors add their colours (colour_view), weighted so that they make colour_share of
        the inner product."""
        extra = math.sqrt(self.search_sigma**2 - self.sigma**2)
        step = 2 if self.search_sigma >= 2 else 1
        grey = (self.size // step) ** 2
        out = np.empty((len(v), grey + (self.colour_view_dims if self.colour else 0)), np.float32)
        for s in range(0, len(v), chunk):
            # a copy of the chunk: v may be a read-only memory map
            part = np.array(v[s:s + chunk], dtype=np.float32)
            t = torch.from_numpy(part[:, :self.grey_dims].copy()).view(-1, 1, self.size, self.size)
            blurred = _gaussian_blur(t, extra)
            # the centre of each 2x2 block (bilinear at half-pixel offsets: the 2x2 mean)
            out[s:s + chunk, :grey] = _unit(F.avg_pool2d(blurred, step) if step > 1 else blurred).numpy()
            if self.colour:
                layout = self.faint_view(out[s:s + chunk, :grey], part[:, -2], part[:, -1])
                out[s:s + chunk, :grey + 2] = math.sqrt(1 - self.colour_share) * layout
                out[s:s + chunk, grey + 2:] = math.sqrt(self.colour_share) * self.colour_view(part[:, self.grey_dims:-2])
        return out

    @property
    def colour_view_dims(self) -> int:
        return 2 + 2 * (self.colour_size // 2) ** 2 + 1

    def faint_view(self, grey: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """RGB images' grey views with their faintness: the unit view scaled by s = std /
        faint_contrast (at most 1), and the rest of the unit length in two components at the
        angle pi * mean level. An image with structure keeps its view (s = 1); faint images,
        whose views are mostly noise, point at the tone they share instead, so they find each
        other as candidates, those of like grey level first."""
        s = np.clip(std / self.faint_contrast, 0, 1)[:, None]
        rest, angle = np.sqrt(1 - s**2), np.pi * mean[:, None]
        return np.concatenate([grey * s, rest * np.cos(angle), rest * np.sin(angle)], 1)

    def colour_view(self, chroma: np.ndarray) -> np.ndarray:
        """Unit vectors of chroma thumbnails, 2x2-pooled (already blurred by one pixel), as a
        share of their size or the floor, whichever is larger, and the rest of the unit length
        in one more component: colours of like hue and size point alike, and nearly grey images
        all point at that last component."""
        c = torch.from_numpy(chroma).view(-1, 2, self.colour_size, self.colour_size)
        c = F.avg_pool2d(c, 2).flatten(1).numpy()
        size = np.maximum(np.linalg.norm(c, axis=1, keepdims=True), self.chroma_floor * math.sqrt(c.shape[1]))
        c = c / size
        return np.concatenate([c, np.sqrt(np.clip(1 - (c**2).sum(1, keepdims=True), 0, 1))], 1)

    def candidate_threshold(self, threshold: float) -> float:
        # the sigma-2 views of pairs at or above threshold correlate at >= 1 - 2 * max_shift * (1 - t)
        # on photos, scenes and the demo digits (benchmarks/near_duplicates.py); 3x leaves a margin
        grey = 1 - 3 * self.max_shift * (1 - threshold)
        if not self.colour:
            return grey
        # colour views of a pair within colour_tolerance d have cosine >= 1 - 2 d^2 (equal sizes
        # are the worst case); the bound is taken at 1.5 d, a margin as the grey one's
        colour = 1 - 2 * (1.5 * self.colour_tolerance) ** 2
        return (1 - self.colour_share) * grey + self.colour_share * colour

    def _overlaps(self, a: torch.Tensor, b: torch.Tensor):
        """a and b over their overlap at each shift tried, each less its mean: [n, s, s] ->
        ([n, m], [n, m]) per shift."""
        s = self.size
        shifts = range(-self.max_shift, self.max_shift + 1)
        for dy in shifts:
            for dx in shifts:
                pa = a[:, max(dy, 0):s + min(dy, 0), max(dx, 0):s + min(dx, 0)].flatten(1)
                pb = b[:, max(-dy, 0):s + min(-dy, 0), max(-dx, 0):s + min(-dx, 0)].flatten(1)
                yield pa - pa.mean(1, keepdim=True), pb - pb.mean(1, keepdim=True)

    def _shifted_correlation(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """max over shifts of the correlation of a and b over their overlap: [n, s, s] -> [n]."""
        best = torch.full((len(a),), -1.0)
        for pa, pb in self._overlaps(a, b):
            r = (pa * pb).sum(1) / (pa.norm(dim=1) * pb.norm(dim=1)).clamp_min(1e-12)
            best = torch.maximum(best, r)
        return best

    def similarity(self, a: np.ndarray, b: np.ndarray, floor: float | None = None) -> np.ndarray:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        sim = self.grey_similarity(a[:, :self.grey_dims], b[:, :self.grey_dims], floor)
        if self.colour:  # RGB: faint images compared on an absolute scale, then the colour check
            ca, cb = a[:, self.grey_dims:], b[:, self.grey_dims:]
            # two grey pictures (no chroma at all: grey images decoded as RGB) take the grey path
            coloured = np.any(ca[:, :-2] != 0, axis=1) | np.any(cb[:, :-2] != 0, axis=1)
            faint_a, faint_b = self.faint(a), self.faint(b)
            faint = coloured & faint_a & faint_b
            if faint.any():
                sim[faint] = self.faint_similarity(a[faint], b[faint])
            # a picture under flat_std of structure but with a feature (so not faint) is no flat
            # picture: beside another that is not faint, its thumbnail, brought to unit length,
            # correlates as any other does (a flat picture is faint: it stays unjoined to them)
            g = self.grey_dims
            featured = coloured & ~faint_a & ~faint_b & ((np.linalg.norm(a[:, :g], axis=1) < 0.999) |
                                                         (np.linalg.norm(b[:, :g], axis=1) < 0.999))
            if featured.any():
                sim[featured] = self.grey_similarity(_unit_rows(a[featured, :g]), _unit_rows(b[featured, :g]), floor)
            # smooth pictures on the absolute scale too: unrelated fields of like colours are apart
            solid = coloured & ~faint
            solid[solid] = self.smooth(a[solid]) & self.smooth(b[solid])  # the blur only where it can matter
            if solid.any():
                sim[solid] = np.minimum(sim[solid], self.absolute_similarity(a[solid], b[solid]))
            colour = np.where(coloured, self.colour_similarity(ca, cb), np.float32(1))
            # as chance's draws (for_chance): a vetoed pair's similarity before the colour check, less VETOED
            sim = np.where(colour >= sim, sim, sim - VETOED).astype(np.float32) if self.chance \
                else np.minimum(sim, colour)
        return sim

    def for_chance(self) -> "PixelEmbedder":
        """This embedder as decide/chance.py measures chance with it (with chance_draws): each
        image's draw is its similarity before the colour check (the grey one, capped by the
        absolute check for RGB pairs with structure) to the most similar candidate whose colours
        agree, or, when the colour check vetoes every candidate, to the most similar one. A vetoed
        pair's value is no similarity the grey law knows (counting it widened the fitted law and
        raised the threshold to 0.97-0.98 on photographs whose grey chance level is 0.90-0.94),
        and leaving such images out left mostly the copies where colours vary (generated scenes:
        the threshold went to 1). Without colour (grey images) it is this embedder."""
        if not self.colour:
            return self
        judge = copy.copy(self)
        judge.chance = True
        return judge

    def chance_draws(self, sim: np.ndarray) -> np.ndarray:
        """Nearest similarities found with for_chance's similarity, as draws of chance."""
        return np.where(sim < -1 - 1e-6, sim + VETOED, sim) if self.chance else sim

    def structure(self, v: np.ndarray) -> np.ndarray:
        """RGB vectors -> their grey thumbnails less their means, as they were before normalising
        (unit length, or flat_std rms when flat: __call__), in units of the range: [n, size^2]."""
        level = self.flat_std / (self.data_range[1] - self.data_range[0])
        return v[:, :self.grey_dims] * np.maximum(v[:, -1], level)[:, None] * math.sqrt(self.grey_dims)

    def faint(self, v: np.ndarray) -> np.ndarray:
        """Whether each RGB vector's picture is faint: its grey standard deviation under
        faint_contrast and no point of its thumbnail more than faint_peak from the mean."""
        out = v[:, -1] < self.faint_contrast
        if out.any():  # the thumbnails of the low-contrast rows only: this runs on every candidate pair
            out[out] = np.abs(self.structure(v[out])).max(1) < self.faint_peak
        return out

    def smooth(self, v: np.ndarray) -> np.ndarray:
        """Whether each vector's grey thumbnail is smooth: its detail (the thumbnail less its blur
        at detail_sigma) under smooth_detail of its structure, so that its normalised layout is
        all the correlation sees."""
        u = torch.from_numpy(np.ascontiguousarray(v[:, :self.grey_dims], np.float32)).view(-1, 1, self.size, self.size)
        detail = (u - _gaussian_blur(u, self.detail_sigma)).flatten(1).norm(dim=1)
        return (detail < self.smooth_detail * u.flatten(1).norm(dim=1)).numpy()

    def absolute_picture(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RGB vectors -> their 8x8 grey picture in units of the range (the thumbnail as it was
        before normalising, pooled to the colour thumbnail's side and blurred as it is) and their
        chroma thumbnail: ([n, 64], [n, 128])."""
        g, c = self.grey_dims, self.colour_size
        grey = self.structure(v) + v[:, -2:-1]
        t = F.avg_pool2d(torch.from_numpy(np.ascontiguousarray(grey, np.float32)).view(-1, 1, self.size, self.size),
                         self.size // c)
        return _gaussian_blur(t, 1.0).flatten(1).numpy(), v[:, g:-2]

    def absolute_similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """RGB pairs on an absolute scale: the rms difference r of their 8x8 grey and colour
        pictures (absolute_picture) once b is mapped onto a by the gain k (in gain_range) and grey
        offset o (within mean_tolerance) that fit best, r = rms(a_Y - k b_Y - o, a_C - k b_C): a
        brightness change is a gain of R, G and B, a contrast change a gain about the mean grey,
        and either is fitted exactly. 1 - (1 - default_threshold) (r / tolerance)^2, tolerance
        absolute_margin * max_shift / size of the range: what the largest shift tried moves a
        ramp that spans the range. Normalised correlation cannot tell two smooth fields of like
        colours apart (two ramps 3 degrees apart correlate at 0.999); their absolute difference
        can."""
        ya, ca = self.absolute_picture(a)
        yb, cb = self.absolute_picture(b)
        k, o = _fit_gain(ya, ca, yb, cb, self.gain_range, self.mean_tolerance)
        r = np.sqrt((((ya - k[:, None] * yb - o[:, None]) ** 2).sum(1) + ((ca - k[:, None] * cb) ** 2).sum(1))
                    / (ya.shape[1] + ca.shape[1]))
        tolerance = self.absolute_margin * self.max_shift / self.size
        return _bounded(1 - (1 - self.default_threshold) * (r / tolerance) ** 2)

    def faint_similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Two RGB images with almost no grey structure (standard deviation under faint_contrast)
        on an absolute scale, where correlating their normalised thumbnails would magnify noise:
        1 - (1 - default_threshold) * w^2, w the largest of the difference of their grey
        thumbnails (mean removed; aligned over the zooms and shifts tried, as the grey
        correlation is) in rms over faint_levels and at its largest over faint_peak_levels, the
        difference of their mean grey levels over faint_mean_levels, and their chroma difference
        (colour_difference) over what a gain of 1.2 gives. A re-encoded, blurred, shifted,
        cropped or rescaled copy stands at or above the default threshold; fields of another grey
        level (a brightened copy among them: a flat field brightened cannot be told from another
        field of that level) or colour, and faint textures or layouts that differ (two tiles of
        one smooth tissue), below it."""
        g = self.grey_dims
        rms, peak = self.aligned_difference(self.structure(a), self.structure(b))
        structure = np.maximum(rms / self.faint_levels, peak / self.faint_peak_levels)
        means = np.abs(a[:, -2] - b[:, -2]) / self.faint_mean_levels
        gain = 0.2  # a gain of 1.2 turns chroma by colour_difference k / (2 + k)
        chroma = colour_difference(a[:, g:-2], b[:, g:-2], self.chroma_floor) / (gain / (2 + gain))
        worst = np.maximum(structure, np.maximum(means, chroma))
        return _bounded(1 - (1 - self.default_threshold) * worst**2)

    def aligned_difference(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Thumbnails [n, size^2] (mean removed, absolute units) -> the rms and the largest
        difference of a and b over their overlap, each overlap's means removed, at the zoom and
        shift (those grey_similarity tries) where the rms is least: ([n], [n])."""
        n, s = len(a), self.size
        if n == 0:
            return np.empty(0, np.float32), np.empty(0, np.float32)
        a = torch.from_numpy(np.ascontiguousarray(a, np.float32)).view(n, s, s)
        b = torch.from_numpy(np.ascontiguousarray(b, np.float32)).view(n, 1, s, s)
        rms, peak = torch.full((n,), math.inf), torch.full((n,), math.inf)
        for z in self.zooms:
            for pa, pb in self._overlaps(a, (b if z == 1 else _zoom(b, z))[:, 0]):
                d = pa - pb
                r = d.pow(2).mean(1).sqrt()
                better = r < rms
                rms, peak = torch.where(better, r, rms), torch.where(better, d.abs().amax(1), peak)
        return rms.numpy(), peak.numpy()

    def grey_similarity(self, a: np.ndarray, b: np.ndarray, floor: float | None = None) -> np.ndarray:
        n, s = len(a), self.size
        if n == 0:
            return np.empty(0, np.float32)
        a = torch.from_numpy(a).view(n, 1, s, s)
        b = torch.from_numpy(b).view(n, 1, s, s)
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
        tone = self.tone(v)
        v = v - v.mean(1, keepdim=True)
        # unit length, or std / flat_std < 1 for a flat image (similarity reads it as flat)
        floor = self.flat_std * math.sqrt(v.shape[1])
        v = v / v.norm(dim=1, keepdim=True).clamp_min(floor)
        if self.colour:
            if x.shape[1] != 3:
                raise ValueError(f"the pixel+colour embedder takes RGB images, got {x.shape[1]} channels")
            v = torch.cat([v, self.chroma(x, flip), tone], 1)
        return v

    def tone(self, thumbnail: torch.Tensor) -> torch.Tensor:
        """[B, size^2] grey thumbnails -> [B, 2]: their mean and standard deviation in units of
        the full range (what normalising the thumbnail takes away)."""
        lo, hi = self.data_range
        t = (thumbnail - lo) / (hi - lo)
        return torch.stack([t.mean(1), t.std(1, correction=0)], 1)

    def chroma(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 2 * colour_size^2]: the opponent colours R - G and (R + G) / 2 - B,
        in units of the full range (0 for grey), area-averaged to colour_size x colour_size and
        blurred by one of its pixels (so that shifts and crops of a few image pixels move little)."""
        lo, hi = self.data_range
        rgb = (x.to(torch.float32) - lo) / (hi - lo)
        c = torch.stack([rgb[:, 0] - rgb[:, 1], (rgb[:, 0] + rgb[:, 1]) / 2 - rgb[:, 2]], 1)
        c = F.interpolate(c, size=(self.colour_size, self.colour_size), mode="bilinear", antialias=True,
                          align_corners=False)
        c = _gaussian_blur(c.reshape(-1, 1, self.colour_size, self.colour_size), 1.0).view_as(c)
        return (c.flip(-1) if flip else c).flatten(1)

    def colour_similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The colour and tone check of RGB vectors' colour parts (chroma, then mean and std):
        1 while the chroma differ by at most colour_tolerance (colour_difference), the means by
        at most mean_tolerance and the contrasts by at most a factor contrast_tolerance, then
        falling steeply (by 4 per unit of the excess, to -1): a veto at about the tolerances
        whatever the threshold, so that a pair's similarity, the smaller of this and the grey
        one, stays on the grey one's scale."""
        chroma_a, chroma_b = a[:, :-2], b[:, :-2]
        excess = colour_difference(chroma_a, chroma_b, self.chroma_floor) - self.colour_tolerance
        excess = np.maximum(excess, np.abs(a[:, -2] - b[:, -2]) - self.mean_tolerance)
        contrast = np.abs(np.log2(np.maximum(a[:, -1], self.contrast_floor) / np.maximum(b[:, -1], self.contrast_floor)))
        excess = np.maximum(excess, contrast - math.log2(self.contrast_tolerance))
        return np.clip(1 - 4 * excess, -1, 1).astype(np.float32)


def _unit_rows(v: np.ndarray) -> np.ndarray:
    """Rows at unit length (zero rows stay zero)."""
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _bounded(similarity: np.ndarray) -> np.ndarray:
    """An absolute-scale similarity kept within (-1, 1]: -1 means a flat image with nothing to
    compare (decide/chance.py takes no draw from it), and below it chance's draws of vetoed pairs
    are encoded (VETOED); a pair this far apart is a draw of chance all the same."""
    return np.clip(similarity, -1 + 1e-3, 1).astype(np.float32)


def _fit_gain(ya: np.ndarray, ca: np.ndarray, yb: np.ndarray, cb: np.ndarray, gains: tuple[float, float],
              offset: float) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares gain k and grey offset o of a ~ (k b_Y + o, k b_C), row by row, then k
    clipped to `gains` and o (refitted for that k) to +-offset: ([n], [n])."""
    n_y = ya.shape[1]
    sy_b, sy_a = yb.sum(1), ya.sum(1)
    s_bb = (yb * yb).sum(1) + (cb * cb).sum(1)
    s_ab = (ya * yb).sum(1) + (ca * cb).sum(1)
    # normal equations of (k, o): [s_bb, sy_b; sy_b, n_y] [k; o] = [s_ab; sy_a]
    det = s_bb * n_y - sy_b**2
    k = np.where(det > 1e-12, (s_ab * n_y - sy_b * sy_a) / np.where(det > 1e-12, det, 1), 1.0)
    k = np.clip(k, *gains)
    o = np.clip((sy_a - k * sy_b) / n_y, -offset, offset)
    return k, o


def colour_difference(a: np.ndarray, b: np.ndarray, floor: float) -> np.ndarray:
    """|a - b| / (|a| + |b|) of two colour thumbnails (rows), each size at least `floor` rms: 0
    for equal colours, 1 for opposite ones, k / (2 + k) for a gain of 1 + k (a brightness or
    contrast change), sin(theta / 2) for a hue turned by theta; two nearly grey images (both
    under `floor`) differ by their difference over twice the floor."""
    root_n = math.sqrt(a.shape[1])
    na = np.maximum(np.linalg.norm(a, axis=1), floor * root_n)
    nb = np.maximum(np.linalg.norm(b, axis=1), floor * root_n)
    return np.linalg.norm(a - b, axis=1) / (na + nb)


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
    "pixel": lambda model=None, image_side=None, channels=1, **kw: PixelEmbedder(
        image_side=min(model.sample_size) if model else image_side,
        data_range=tuple(model.data_range) if model else (-1.0, 1.0),
        channels=model.channels if model else channels),
    "unet": lambda model=None, **kw: UNetEmbedder(model.score_fn, prepare=model.prepare),
    "torchscript": lambda model=None, path="", size=224, device="cpu", **kw: TorchScriptEmbedder(
        path, size, device, model.data_range if model else (-1.0, 1.0)),
}


def make_embedder(spec: str, model=None, size: int = 224, device: str | torch.device = "cpu",
                  image_side: int | None = None, channels: int = 1) -> Embedder:
    """'pixel', 'unet' or 'torchscript:PATH' -> an embedder; image_side and channels: those of the
    images it is given when there is no model (memclean dedup)."""
    name, _, path = spec.partition(":")
    if name not in EMBEDDERS:
        raise ValueError(f"embedder {spec!r} is not one of pixel, unet, torchscript:PATH")
    if name == "torchscript" and not path:
        raise ValueError("the torchscript embedder needs a file: --embedder torchscript:PATH")
    device = usable_device(device)
    return EMBEDDERS[name](model=model, path=path, size=size, device=device, image_side=image_side,
                           channels=channels)
