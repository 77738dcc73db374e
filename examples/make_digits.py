"""Build the bundled demo data from scikit-learn's handwritten digits (1,797 8x8 images).

    python examples/make_digits.py examples/digits

writes 16x16 grayscale PNGs:
    train/u####.png          unique training images
    train/e##_c##.png        planted exact duplicates: group g copied COPIES[g % 4] times (4-32)
    train/n##_c##.png        planted near duplicates (contrast within 10%; c00 is the digit itself)
    heldout/h####.png        images the model never sees (the reference split)
    planted.csv              file, group, kind, copies of every planted copy
The construction is deterministic (seeded); scikit-learn is needed only to rebuild.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

SIZE = 16  # output resolution
UNIQUE, HELDOUT = 300, 200  # unique training images, held-out images
COPIES = (4, 8, 16, 32)  # copies per planted group: duplication in different numbers
EXACT_GROUPS = NEAR_GROUPS = 2 * len(COPIES)  # two exact and two near groups per copy count


def upscale(digit: np.ndarray) -> Image.Image:
    """8x8 values 0..16 -> 16x16 uint8 grayscale, bilinear."""
    img = Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8), "L")
    return img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def near_copy(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Contrast within 10%, applied to the 8x8 digit before upscaling: a re-exported copy.
    (A shift of one 16 px pixel is half a source pixel: it would move the copy off the
    bilinear-upscaled images' subspace, which every other image lies on, and make it an
    outlier rather than a near copy.)"""
    return upscale(np.clip(digit * rng.uniform(0.9, 1.1), 0, 16))


def write_set(out: Path, unique: list[Image.Image], heldout: list[Image.Image],
              planted: list[tuple[Image.Image, Callable[[], Image.Image]]]) -> int:
    """An evidence set's folders: train/u####.png (unique), heldout/h####.png, and group g of
    `planted` (base image, a maker of near copies) as train/e##_c## (exact copies, the first
    EXACT_GROUPS groups) or n##_c## (near copies; c00 is the base), COPIES[g % 4] files each,
    listed in planted.csv. Earlier PNGs are removed first. Returns the planted files written."""
    for old in (out / "train", out / "heldout"):
        for f in old.glob("*.png") if old.is_dir() else ():
            f.unlink()
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(unique):
        img.save(out / "train" / f"u{i:04d}.png")
    for i, img in enumerate(heldout):
        img.save(out / "heldout" / f"h{i:04d}.png")
    rows = []
    for g, (base, near) in enumerate(planted):
        kind = "exact" if g < EXACT_GROUPS else "near"
        for c in range(COPIES[g % len(COPIES)]):
            name = f"{kind[0]}{g:02d}_c{c:02d}.png"
            (base if kind == "exact" or c == 0 else near()).save(out / "train" / name)
            rows.append({"file": f"train/{name}", "group": g, "kind": kind, "copies": COPIES[g % len(COPIES)]})
    with open(out / "planted.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "group", "kind", "copies"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main(out: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits().images
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits))
    groups = EXACT_GROUPS + NEAR_GROUPS
    unique, planted, heldout = np.split(order[:UNIQUE + groups + HELDOUT], [UNIQUE, UNIQUE + groups])
    write_set(out, [upscale(digits[k]) for k in unique], [upscale(digits[k]) for k in heldout],
              [(upscale(digits[k]), lambda k=k: near_copy(digits[k], rng)) for k in planted])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/digits"))
