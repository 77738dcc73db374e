"""Build the photo evidence set from the test photographs that scikit-image and scikit-learn ship.

    python examples/make_photos.py PHOTOS_DIR examples/photos

PHOTOS_DIR holds the photographs (benchmarks/near_duplicates.py --wheels extracts them from the
wheels `pip download scikit-image scikit-learn --no-deps` fetches: astronaut, camera, coffee,
chelsea, the Hubble deep field, a retina, ...). Each photo is resized so that its shorter side
is 224 px and cut into 32x32 RGB tiles (grey photos as grey RGB), so the set spans flat sky,
black retina corners, smooth skin and fine texture: the complexity that a likelihood tracks.
Writes 32x32 RGB PNGs:
    train/u####.png          unique training tiles
    train/e##_c##.png        planted exact duplicates: group g copied COPIES[g % 4] times (4-32)
    train/n##_c##.png        planted near duplicates (c00 is the tile itself; the others JPEG
                             q90 re-encodes with brightness within 5%: a re-exported copy)
    heldout/h####.png        tiles the model never sees (the reference split)
    planted.csv              file, group, kind, copies of every planted copy
Tiles are assigned to the splits at random (seeded), so members and held-out tiles come from
the same photographs in the same proportions; planted tiles are drawn from the members' pool.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_digits import EXACT_GROUPS, NEAR_GROUPS, write_set  # noqa: E402

SIZE = 32  # tile side
SHORT_SIDE = 224  # each photo resized to this shorter side before tiling
UNIQUE, HELDOUT = 400, 300  # unique training tiles, held-out tiles (planted groups: as the digits')
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "china.jpg", "clock_motion.png",
          "coffee.png", "coins.png", "flower.jpg", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
          "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")


def tiles(photos: Path) -> list[Image.Image]:
    """Every 32x32 tile of every photo (resized to SHORT_SIDE), row by row, as RGB."""
    out = []
    for name in PHOTOS:
        img = Image.open(photos / name).convert("RGB")
        scale = SHORT_SIDE / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        for y in range(0, img.height - SIZE + 1, SIZE):
            for x in range(0, img.width - SIZE + 1, SIZE):
                out.append(img.crop((x, y, x + SIZE, y + SIZE)))
    return out


def near_copy(tile: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness within 5%, then a JPEG q90 re-encode: a copy as a re-export would make it."""
    buf = io.BytesIO()
    ImageEnhance.Brightness(tile).enhance(rng.uniform(0.95, 1.05)).save(buf, "JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def main(photos: Path, out: Path) -> None:
    pool = tiles(photos)
    distinct = {t.tobytes(): k for k, t in enumerate(pool)}  # identical tiles (black corners) once
    pool = [pool[k] for k in sorted(distinct.values())]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pool))
    groups = EXACT_GROUPS + NEAR_GROUPS
    if len(order) < UNIQUE + groups + HELDOUT:
        raise SystemExit(f"{len(order)} distinct tiles: {UNIQUE + groups + HELDOUT} are needed")
    unique, planted, heldout = np.split(order[:UNIQUE + groups + HELDOUT], [UNIQUE, UNIQUE + groups])
    copies = write_set(out, [pool[k] for k in unique], [pool[k] for k in heldout],
                       [(pool[k], lambda k=k: near_copy(pool[k], rng)) for k in planted])
    print(f"{len(pool)} distinct tiles: {UNIQUE} unique members, {copies} planted copies of {groups} tiles, "
          f"{HELDOUT} held out -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "examples/photos"))
