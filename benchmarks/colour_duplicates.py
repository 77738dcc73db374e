"""Near duplicates in colour: the pixel embedder with its colour check, without it (grey only, as
before), and pHash, on seven colour sets with planted near copies, and on the two digits sets.

    .venv/bin/python benchmarks/colour_duplicates.py [--photos DIR] [--seeds 0 1 2] [--sets ...] [--no-write]
        [--sweep] [--show]

Sets, built here from what installed packages ship (the photographs: benchmarks/near_duplicates.py
--wheels; scikit-image's drawn images from its wheel in --wheels). Each holds 10 near copies of
each of six kinds (JPEG q70, brightness +12%, Gaussian blur radius 1, a 3/4 rescale, a 2-pixel
shift, a 5% crop), of distinct images:
- photos: 64x64 tiles of the 18 package photographs, halved: the set of benchmarks/near_duplicates.py
  (photo_set), with its skies, flat black corners and textures.
- graphics: 480 generated logos (shapes and a letter on a flat, linear or radial gradient, or
  photograph background), and tiles of scikit-image's logo, colour wheel and RGB chessboard; 40
  recoloured twins (the same drawing in another palette, a photograph background hue-turned:
  distinct images with the same grey layout).
- recoloured photos: 64x64 tiles of the 18 photographs at half their size, offset by half a tile
  from the photos set's (other tiles); 30 twins of tiles whose colour shows (mean chroma, max -
  min of R, G, B, at least 24 levels), their hue turned by 60-300 degrees or their channels
  swapped.
- colourways: the recoloured photos set with a twin for every tile whose colour shows (153 of
  its 271 tiles), as a catalogue holds a product in each of its colours: most images have a
  look-alike in grey layout that is no copy.
- full-size photos: 527 64x64 tiles drawn at random from the 10 colour photographs at full size
  (1,146 tiles: 484 of them the retina's, with its black corners and smooth tissue; the Hubble
  deep field's dark sky), the issue's 587 images with their 60 copies: tiles no other set holds.
- full-size photos at 128 px: all 273 128x128 tiles of those photographs and 60 copies (the
  embedder's thumbnail is 32x32 whatever the image's size: a 2-pixel shift is half of its pixel).
- smooth fields: 480 generated two-tone splits, linear and radial gradients and near-flat colour
  fields, in colours drawn uniformly in hue, and 40 recoloured twins: unrelated fields of like
  colours are look-alikes here, the case where near copies cannot be told from chance.
Images that no person can tell apart (every pixel within 4 levels, as the black corners of the
retina photograph are) are one group, as identical ones are. Each set is clustered as a run
clusters it (decode, the pixel embedder, decide/chance.py's threshold from the dataset,
find_clusters), at that threshold and at a fixed 0.95. Pairwise precision and recall against the
groups, and per kind the copies joined to their image. The digits sets (grey, one channel) take
the grey path, unchanged. Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import colorsys
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))
from benchmarks.dup_threshold import RATE, digits_second, load_digits, planted_truth  # noqa: E402
from benchmarks.near_duplicates import (KINDS, PHOTOS, copy_of, indistinguishable, pair_stats,  # noqa: E402
                                        phash_clusters, photo_set, recall_by_kind)
from benchmarks.results import hardware, publish  # noqa: E402
from pipeline.decide.chance import threshold_by_chance  # noqa: E402
from pipeline.decide.clusters import find_clusters  # noqa: E402
from pipeline.decide.embeddings import PixelEmbedder  # noqa: E402
from pipeline.decide.index import build_index, search_views  # noqa: E402
from pipeline.io.data import ImageSpec, batched, discover  # noqa: E402

COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "china.jpg", "flower.jpg", "hubble_deep_field.jpg",
                 "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
GRAPHICS = ("logo.png", "color.png", "chessboard_RGB.png")  # scikit-image's drawn images
SIDE = 64
SMOOTH = ("split", "linear", "radial", "flat")  # the smooth fields' kinds
SUMMARY: list[tuple[str, str, str, float, float]] = []  # (set, method, threshold, precision, recall) of every row


def hue_rotated(img: Image.Image, degrees: float) -> Image.Image:
    """The image with every pixel's hue turned by `degrees` (HSV), value and saturation kept."""
    h, s, v = img.convert("HSV").split()
    h = h.point(lambda p: int(p + degrees * 256 / 360) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour: hue uniform, saturation and value spread over what photos and logos use."""
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.15, 1.0))
    return int(255 * r), int(255 * g), int(255 * b)


def drawing(kind: str, rng: np.random.Generator, tiles: list | None = None) -> tuple[callable, int]:
    """A drawing of one kind: draw(palette) -> image, and how many colours its palette takes
    (tiles: photographs' tiles a logo may be drawn on)."""
    n = SIDE
    if kind in ("linear", "radial"):
        angle, cx, cy = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
        t = ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)) / np.sqrt(0.5) + 0.5 if kind == "linear" \
            else np.hypot(xx - cx, yy - cy) / np.sqrt(2)
        t = np.clip(t, 0, 1)[..., None]

        def draw(p):
            return Image.fromarray(np.uint8(np.asarray(p[0]) * (1 - t) + np.asarray(p[1]) * t + 0.5))
        return draw, 2
    if kind == "flat":
        noise = rng.normal(0, rng.uniform(0.5, 3.0), (n, n, 1))
        vignette = rng.uniform(0, 12) * np.hypot(*(np.mgrid[0:n, 0:n] / (n - 1) - 0.5))[..., None]

        def draw(p):
            return Image.fromarray(np.uint8(np.clip(np.asarray(p[0]) + noise - vignette, 0, 255) + 0.5))
        return draw, 1
    if kind == "split":
        a, b = rng.uniform(-1, 1, 2)
        yy, xx = np.mgrid[0:n, 0:n] / (n - 1) - 0.5
        mask = (a * xx + b * yy + rng.uniform(-0.2, 0.2) > 0)[..., None]

        def draw(p):
            return Image.fromarray(np.where(mask, np.asarray(p[0]), np.asarray(p[1])).astype(np.uint8))
        return draw, 2
    # a logo: shapes and a letter on a background, flat, a gradient or a photograph's tile (its
    # hue turned by the palette's first colour's, so that another palette recolours it too)
    shapes = [(str(rng.choice(["ellipse", "rectangle", "polygon"])), sorted(rng.uniform(4, n - 4, 2)),
               sorted(rng.uniform(4, n - 4, 2))) for _ in range(int(rng.integers(1, 4)))]
    letter, at = chr(int(rng.integers(65, 91))), tuple(rng.uniform(4, n - 16, 2))
    kind = str(rng.choice(["flat", "linear", "radial", "photo"]))
    if kind == "photo" and tiles:
        tile = tiles.pop(int(rng.integers(len(tiles))))  # each tile under one logo

        def background(p):
            return hue_rotated(tile, colorsys.rgb_to_hsv(*(np.array(p[0]) / 255))[0] * 360)
    else:
        background = drawing("flat" if kind == "photo" else kind, rng)[0]

    def draw(p):
        img = background([p[0], p[3]])
        d = ImageDraw.Draw(img)
        for k, (shape, xs, ys) in enumerate(shapes):
            box = [xs[0], ys[0], xs[1], ys[1]]
            fill = p[1 + k % 2]
            if shape == "ellipse":
                d.ellipse(box, fill=fill)
            elif shape == "rectangle":
                d.rectangle(box, fill=fill)
            else:
                d.polygon([(xs[0], ys[1]), ((xs[0] + xs[1]) / 2, ys[0]), (xs[1], ys[1])], fill=fill)
        d.text(at, letter, fill=p[2])
        return img
    return draw, 4


def graphics_set(photos: Path, root: Path, seed: int, n: int = 480, twins: int = 40, per_kind: int = 10,
                 kinds: tuple[str, ...] = ("logo",)) -> dict[str, int]:
    """The graphics set (or with kinds=SMOOTH the smooth fields) into root; returns {file: group}
    (-1 = no copy)."""
    rng = np.random.default_rng(100 + seed + (50 if kinds == SMOOTH else 0))
    root.mkdir(parents=True)
    tiles = []  # the backgrounds of logos on photographs: 64x64 tiles of the photographs at a third of their size
    for name in PHOTOS:
        img = Image.open(photos / name).convert("RGB")
        img = img.resize((img.width // 3, img.height // 3), Image.Resampling.LANCZOS)
        tiles += [img.crop((x, y, x + SIDE, y + SIDE)) for y in range(0, img.height - SIDE + 1, SIDE)
                  for x in range(0, img.width - SIDE + 1, SIDE)]
    images = []
    for k in range(n):
        draw, colours = drawing(kinds[k % len(kinds)], rng, tiles)
        palette = [colour(rng) for _ in range(colours)]
        images.append((f"g{k:04d}_{kinds[k % len(kinds)]}.png", draw(palette), draw, colours))
    for name in GRAPHICS if kinds != SMOOTH else ():  # scikit-image's drawn images, in 64x64 tiles at half size
        img = Image.open(photos.parent / "graphics" / name).convert("RGB")
        img = img.resize((max(SIDE, img.width // 2), max(SIDE, img.height // 2)), Image.Resampling.LANCZOS)
        for y in range(0, img.height - SIDE + 1, SIDE):
            for x in range(0, img.width - SIDE + 1, SIDE):
                images.append((f"{Path(name).stem}_{y:03d}_{x:03d}.png", img.crop((x, y, x + SIDE, y + SIDE)), None, 0))
    truth, by_pixels = {}, {}
    for k, (name, img, _, _) in enumerate(images):
        img.save(root / name)
        truth[name] = by_pixels.setdefault(img.tobytes(), -2 - k)
    drawn = [k for k, im in enumerate(images) if im[2] is not None]
    for j, k in enumerate(rng.choice(drawn, twins, replace=False)):  # the same drawing, another palette
        name, _, draw, colours = images[k]
        twin = draw([colour(rng) for _ in range(colours)])
        twin.save(root / f"{Path(name).stem}__twin.png")
        truth[f"{Path(name).stem}__twin.png"] = by_pixels.setdefault(twin.tobytes(), -10_000 - j)
    plant(images, truth, root, rng, per_kind)
    return indistinguishable(root, truth)


def plant(images: list, truth: dict[str, int], root: Path, rng: np.random.Generator, per_kind: int) -> None:
    """per_kind near copies of each kind, of distinct images."""
    chosen = rng.choice(len(images), per_kind * len(KINDS), replace=False)
    for j, k in enumerate(chosen):
        name, img = images[k][0], images[k][1]
        kind = KINDS[j // per_kind]
        copy = f"{Path(name).stem}__{kind}.png"
        copy_of(img, kind, rng).save(root / copy)
        truth[copy] = truth[name]


def full_size_set(photos: Path, root: Path, seed: int, n: int = 527, per_kind: int = 10,
                  side: int = SIDE) -> dict[str, int]:
    """n side x side tiles drawn from the colour photographs at full size (all of them where
    there are fewer), and their near copies, into root; returns {file: group} (-1 = no copy)."""
    rng = np.random.default_rng(1000 + seed + (side if side != SIDE else 0))
    root.mkdir(parents=True)
    tiles = []
    for name in COLOUR_PHOTOS:
        img = Image.open(photos / name).convert("RGB")
        tiles += [(f"{Path(name).stem}_{y:04d}_{x:04d}.png", img.crop((x, y, x + side, y + side)))
                  for y in range(0, img.height - side + 1, side) for x in range(0, img.width - side + 1, side)]
    tiles = [tiles[k] for k in sorted(rng.choice(len(tiles), min(n, len(tiles)), replace=False))]
    truth, by_pixels = {}, {}
    for k, (name, tile) in enumerate(tiles):
        tile.save(root / name)
        truth[name] = by_pixels.setdefault(tile.tobytes(), -2 - k)
    plant([(name, tile) for name, tile in tiles], truth, root, rng, per_kind)
    return indistinguishable(root, truth)


def recoloured_set(photos: Path, root: Path, seed: int, twins: int | None = 30, per_kind: int = 10) -> dict[str, int]:
    """The recoloured photos set into root (twins=None: every tile whose colour shows has a twin,
    the colourways set); returns {file: group} (-1 = no copy)."""
    rng = np.random.default_rng(200 + seed)
    root.mkdir(parents=True)
    images = []
    for name in PHOTOS:
        img = Image.open(photos / name).convert("RGB")
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)
        for y in range(SIDE // 2, img.height - SIDE + 1, SIDE):
            for x in range(SIDE // 2, img.width - SIDE + 1, SIDE):
                images.append((f"{Path(name).stem}_{y:03d}_{x:03d}.png", img.crop((x, y, x + SIDE, y + SIDE))))
    truth, by_pixels = {}, {}
    for k, (name, img) in enumerate(images):
        img.save(root / name)
        truth[name] = by_pixels.setdefault(img.tobytes(), -2 - k)
    # twins of tiles whose colour shows (a mean chroma, max - min of R, G, B, of at least 24
    # levels): recolouring a nearly grey tile (the Hubble field's black) changes nothing a person sees
    coloured = [k for k, (_, img) in enumerate(images) if np.ptp(np.asarray(img, np.int16), axis=2).mean() >= 24]
    for j, k in enumerate(rng.choice(coloured, len(coloured) if twins is None else twins, replace=False)):
        name, img = images[k]
        if j % 4 == 3:
            r, g, b = img.split()
            twin = Image.merge("RGB", (b, r, g))
        else:
            twin = hue_rotated(img, rng.uniform(60, 300))
        twin.save(root / f"{Path(name).stem}__twin.png")
        truth[f"{Path(name).stem}__twin.png"] = by_pixels.setdefault(twin.tobytes(), -10_000 - j)
    plant([(n, i) for n, i in images], truth, root, rng, per_kind)
    return indistinguishable(root, truth)


def embed(root: Path, side: int, channels: int, emb: PixelEmbedder):
    decoded = [d for b in batched(discover(str(root)), ImageSpec(channels, (side, side)), 256) for d in b]
    v = emb(torch.stack([d.pixels for d in decoded])).numpy()
    return [Path(d.item.id).name for d in decoded], v, [d.pixel_sha256 for d in decoded]


def clusters(root: Path, side: int, channels: int, emb: PixelEmbedder, reference: Path | None = None):
    """(ids, {how: (threshold, cluster)}) as a run clusters: the chance-judged threshold, and 0.95."""
    ids, v, hashes = embed(root, side, channels, emb)
    views = search_views(v, emb.search_view)
    index = build_index(views)
    ref = embed(reference, side, channels, emb)[1] if reference is not None else None
    t = threshold_by_chance(v, hashes, index, views, emb, RATE, ref, None, ids).value
    out = {}
    for how, threshold in (("auto", t), ("0.95", 0.95)):
        c = find_clusters(v, hashes, np.zeros(len(ids)), ids, threshold, emb, index=index, views=views)
        out[how] = (threshold, c.cluster)
    return ids, out


def false_pairs(truth: dict[str, int], ids: list[str], cluster: np.ndarray) -> list[tuple[str, str]]:
    g = np.array([truth[i] for i in ids])
    out = []
    for c in set(cluster[cluster >= 0].tolist()):
        members = np.where(cluster == c)[0]
        for a in members:
            for b in members:
                if a < b and (g[a] == -1 or g[a] != g[b]):
                    out.append((ids[a], ids[b]))
    return out


def row(label: str, method: str, how: str, truth: dict[str, int], ids: list[str], cluster: np.ndarray,
        seconds: float | None) -> str:
    """One table row: pairwise precision and recall, false pairs, and copies joined by kind."""
    st = pair_stats(truth, ids, cluster)
    SUMMARY.append((label.split(",")[0], method, how.split(" ")[0], st["precision"], st["recall"]))
    kinds = label.split(",")[0] in ("photos", "graphics", "recoloured photos", "colourways", "smooth fields",
                                    "full-size photos", "full-size photos at 128 px")
    by_kind = recall_by_kind(truth, ids, cluster) if kinds else {}
    line = (f"| {label} | {method} | {how} | {len(ids)} | {st['true_pairs']} | {st['precision']:.3f} | "
            f"{st['recall']:.3f} | {st['false_pairs']} | {' '.join(f'{k} {x}' for k, x in by_kind.items())} | "
            f"{'' if seconds is None else f'{seconds:.1f}'} |")
    print(line, flush=True)
    return line


def sweep(label: str, root: Path, truth: dict[str, int], side: int) -> None:
    """Prints (--sweep; RESULTS.md is not written from it) what bounds the colour check on a set:
    the best over thresholds 0.90 to 1.0 (steps of 0.0025) of the worse of pairwise precision and
    recall, and the quantiles of each unique image's most similar other image (every other image
    compared) by the similarity clustering uses and as chance's draws (for_chance)."""
    emb = PixelEmbedder(image_side=side, channels=3)
    ids, v, hashes = embed(root, side, 3, emb)
    views = search_views(v, emb.search_view)
    index = build_index(views)
    best = (-1.0, 0.0, 0.0, 0.0)
    for t in np.arange(0.9, 1.0, 0.0025):
        c = find_clusters(v, hashes, np.zeros(len(ids)), ids, float(t), emb, index=index, views=views)
        st = pair_stats(truth, ids, c.cluster)
        best = max(best, (min(st["precision"], st["recall"]), float(t), st["precision"], st["recall"]))
    g = np.array([truth[i] for i in ids])
    judge = emb.for_chance()
    nearest, drawn = [], []
    for a in range(len(ids)):
        if g[a] != -1 and (g == g[a]).sum() > 1:
            continue  # a planted group's member: not a draw of chance
        others = np.delete(np.arange(len(ids)), a)
        nearest.append(emb.similarity(np.repeat(v[[a]], len(others), 0), v[others]).max())
        drawn.append(judge.chance_draws(judge.similarity(np.repeat(v[[a]], len(others), 0), v[others])).max())
    q = (0.5, 0.9, 0.99, 1.0)
    print(f"   sweep, {label}: best min(precision, recall) {best[0]:.3f} at {best[1]:.4f} (precision {best[2]:.3f}, "
          f"recall {best[3]:.3f}); {len(nearest)} unique images' most similar other image at quantiles {q}: "
          f"{np.round(np.quantile(nearest, q), 4).tolist()}, as chance's draws {np.round(np.quantile(drawn, q), 4).tolist()}",
          flush=True)


SWEEP = False  # --sweep


def measure(label: str, root: Path, truth: dict[str, int], side: int, channels: int,
            reference: Path | None = None, show: bool = False) -> list[str]:
    if SWEEP and channels == 3:
        sweep(label, root, truth, side)
    lines = []
    for method, emb in (("colour check", PixelEmbedder(image_side=side, channels=channels)),
                        ("grey only (before)", PixelEmbedder(image_side=side))):
        t0 = time.perf_counter()
        ids, found = clusters(root, side, channels, emb, reference)
        seconds = time.perf_counter() - t0
        for how, (threshold, cluster) in found.items():
            lines.append(row(label, method, f"{how} {threshold:.4f}", truth, ids, cluster, seconds))
            if show and how == "auto":
                print("   false:", false_pairs(truth, ids, cluster)[:40])
    if channels == 3:
        ids = embed(root, side, channels, PixelEmbedder(image_side=side, channels=channels))[0]
        lines.append(row(label, "pHash <= 10", "", truth, ids, phash_clusters(root, ids), None))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=Path.home() / ".cache/memclean-bench/photos")
    ap.add_argument("--wheels", type=Path, default=Path.home() / ".cache/memclean-bench/wheels")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sets", nargs="+",
                    default=["photos", "graphics", "recoloured", "colourways", "smooth", "full-size", "full-size-128",
                             "digits"])
    ap.add_argument("--show", action="store_true", help="print the false pairs")
    ap.add_argument("--sweep", action="store_true", help="print each colour set's best threshold and its unique "
                    "images' nearest similarities (sweep)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    global SWEEP
    SWEEP = args.sweep
    torch.set_num_threads(2)
    extract_graphics(args.wheels, args.photos.parent / "graphics")
    missing = [p for p in PHOTOS if not (args.photos / p).exists()]
    if missing:
        sys.exit(f"photos missing from {args.photos}: {missing} (benchmarks/near_duplicates.py --wheels)")
    lines = ["| set | method | threshold | images | true pairs | precision | recall | false pairs | "
             "copies joined by kind | s |", "|---" * 10 + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            if "photos" in args.sets:
                truth = photo_set(args.photos, tmp / f"photos{seed}", seed=seed)
                lines += measure(f"photos, seed {seed}", tmp / f"photos{seed}", truth, SIDE, 3, show=args.show)
            if "graphics" in args.sets:
                truth = graphics_set(args.photos, tmp / f"graphics{seed}", seed)
                lines += measure(f"graphics, seed {seed}", tmp / f"graphics{seed}", truth, SIDE, 3, show=args.show)
            if "smooth" in args.sets:
                truth = graphics_set(args.photos, tmp / f"smooth{seed}", seed, kinds=SMOOTH)
                lines += measure(f"smooth fields, seed {seed}", tmp / f"smooth{seed}", truth, SIDE, 3, show=args.show)
            if "full-size" in args.sets:
                truth = full_size_set(args.photos, tmp / f"full{seed}", seed)
                lines += measure(f"full-size photos, seed {seed}", tmp / f"full{seed}", truth, SIDE, 3, show=args.show)
            if "full-size-128" in args.sets:
                truth = full_size_set(args.photos, tmp / f"full128-{seed}", seed, side=128)
                lines += measure(f"full-size photos at 128 px, seed {seed}", tmp / f"full128-{seed}", truth, 128, 3,
                                 show=args.show)
            if "recoloured" in args.sets:
                truth = recoloured_set(args.photos, tmp / f"recoloured{seed}", seed)
                lines += measure(f"recoloured photos, seed {seed}", tmp / f"recoloured{seed}", truth, SIDE, 3,
                                 show=args.show)
            if "colourways" in args.sets:
                truth = recoloured_set(args.photos, tmp / f"colourways{seed}", seed, twins=None)
                lines += measure(f"colourways, seed {seed}", tmp / f"colourways{seed}", truth, SIDE, 3,
                                 show=args.show)
        if "digits" in args.sets:
            lines += measure("demo digits", REPO / "examples/digits/train", planted_truth(REPO / "examples/digits"),
                             16, 1, REPO / "examples/digits/heldout")
            truth = digits_second(tmp / "digits2", load_digits(args.wheels))
            lines += measure("second digits", tmp / "digits2/train", truth, 16, 1, tmp / "digits2/heldout")
    text = (f"Hardware: {hardware()}. The pixel embedder at the threshold a run judges against chance from the "
            f"dataset (false-join rate {RATE}; the digits: against their held-out images) and at a fixed 0.95, with "
            "its colour check and without it (grey only, the embedder before), and pHash (imagededup's default, "
            "Hamming distance <= 10). Pairwise precision and recall of the planted groups.\n\n"
            + summary() + "\n\nEvery run:\n\n" + "\n".join(lines))
    publish("colour-duplicates", "Near duplicates in colour: `benchmarks/colour_duplicates.py`", text,
            write=not args.no_write)


def summary() -> str:
    """The worst precision and recall over the seeds, per set, method and threshold."""
    out = ["| set | method | threshold | worst precision | worst recall | runs |", "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((a, b, c) for a, b, c, _, _ in SUMMARY))
    for key in keys:
        got = [(p, r) for a, b, c, p, r in SUMMARY if (a, b, c) == key]
        out.append(f"| {key[0]} | {key[1]} | {key[2] or 'its own'} | {min(p for p, _ in got):.3f} | "
                   f"{min(r for _, r in got):.3f} | {len(got)} |")
    return "\n".join(out)


def extract_graphics(wheels: Path, folder: Path) -> None:
    """scikit-image's drawn images (GRAPHICS) from its wheel in `wheels`, once."""
    import zipfile

    if all((folder / g).exists() for g in GRAPHICS):
        return
    wheel = next(iter(sorted(wheels.glob("scikit_image-*.whl"))), None)
    if wheel is None:
        sys.exit(f"no scikit_image wheel in {wheels} (pip download scikit-image --no-deps -d DIR)")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for g in GRAPHICS:
            (folder / g).write_bytes(z.read(f"skimage/data/{g}"))


if __name__ == "__main__":
    main()
