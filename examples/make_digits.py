"""Build the bundled demo data from scikit-learn's handwritten digits (1,797 8x8 images).

    python examples/make_digits.py examples/digits

writes 16x16 grayscale PNGs:
    train/u####.png          unique training images
    train/e##_c##.png        planted exact duplicates (each of E images copied C times)
    train/n##_c##.png        planted near duplicates (brightness/contrast within 10%, 1 px shift)
    heldout/h####.png        images the model never sees (the reference split)
    planted.csv              file, group, kind of every planted copy
The construction is deterministic (seeded); scikit-learn is needed only to rebuild.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16  # output resolution
UNIQUE, HELDOUT = 320, 200  # unique training images, held-out images
EXACT_GROUPS, NEAR_GROUPS, COPIES = 6, 6, 15  # planted groups and copies per group


def upscale(digit: np.ndarray) -> Image.Image:
    """8x8 values 0..16 -> 16x16 uint8 grayscale, bilinear."""
    img = Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8), "L")
    return img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def near_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness/contrast within 10% and a shift of up to 1 px."""
    a = np.asarray(img, dtype=np.float64)
    a = (a - a.mean()) * rng.uniform(0.9, 1.1) + a.mean() * rng.uniform(0.9, 1.1)
    a = np.roll(a, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def main(out: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits().images
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits))
    groups = EXACT_GROUPS + NEAR_GROUPS
    unique, planted, heldout = np.split(order[:UNIQUE + groups + HELDOUT], [UNIQUE, UNIQUE + groups])
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(unique):
        upscale(digits[k]).save(out / "train" / f"u{i:04d}.png")
    for i, k in enumerate(heldout):
        upscale(digits[k]).save(out / "heldout" / f"h{i:04d}.png")
    rows = []
    for g, k in enumerate(planted):
        kind = "exact" if g < EXACT_GROUPS else "near"
        base = upscale(digits[k])
        for c in range(COPIES):
            name = f"{kind[0]}{g:02d}_c{c:02d}.png"
            (base if kind == "exact" or c == 0 else near_copy(base, rng)).save(out / "train" / name)
            rows.append({"file": f"train/{name}", "group": g, "kind": kind})
    with open(out / "planted.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "group", "kind"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/digits"))
