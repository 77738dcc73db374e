"""Near duplicates on photographs: the pixel embedder's pairwise precision and recall, by kind.

    .venv/bin/python benchmarks/near_duplicates.py [--photos DIR] [--wheels DIR] [--no-write]

The photographs are real ones that are not shipped with memclean: the test images inside the
scikit-image and scikit-learn wheels (astronaut, camera, coffee, chelsea, the Hubble deep field,
a retina, ...). `--wheels DIR` extracts them from wheels downloaded with
`pip download scikit-image scikit-learn --no-deps -d DIR` into --photos (default
~/.cache/memclean-bench/photos). Synthetic images among them (chessboards, logos, text, the
phantom) are left out, and of the stereo pair motorcycle_left/right only the left is used.

Each photo is halved and cut into 64x64 tiles; 10 tiles each get one near copy of six kinds
(JPEG q70, brightness +12%, Gaussian blur radius 1, a 3/4 rescale to 48x48, a 2-pixel shift,
a 5% crop from one corner), as a user's folder would hold them. Ground truth: a copy belongs
with its tile, and tiles no person can tell apart (every pixel within 4 levels: the black
retina corners, 0-4) are one group; every other joined pair is a false join. The same is measured on generated scenes (tests/planted.py) and
on the demo's 16x16 digits (examples/digits/planted.csv), for the pixel embedder as it was
before (shift-only thumbnail correlation, no flat-image guard), and for pHash (imagededup's default: 64-bit DCT hash, Hamming distance <= 10), reimplemented here
because imagededup is not installed. Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.results import hardware, write_section  # noqa: E402
from pipeline.decide.clusters import find_clusters  # noqa: E402
from pipeline.decide.embeddings import PixelEmbedder  # noqa: E402
from pipeline.io.data import ImageSpec, batched, discover  # noqa: E402
from tests.planted import planted_set  # noqa: E402

PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "china.jpg", "clock_motion.png",
          "coffee.png", "coins.png", "flower.jpg", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
          "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
KINDS = ("jpeg70", "brightness12", "blur1", "rescale34", "shift2", "crop5")


def extract(wheels: Path, photos: Path) -> None:
    photos.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if Path(name).name in PHOTOS:
                    (photos / Path(name).name).write_bytes(z.read(name))


def copy_of(tile: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = tile.size
    if kind == "jpeg70":
        buf = io.BytesIO()
        tile.save(buf, "JPEG", quality=70)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "brightness12":
        return ImageEnhance.Brightness(tile).enhance(1.12)
    if kind == "blur1":
        return tile.filter(ImageFilter.GaussianBlur(1))
    if kind == "rescale34":
        return tile.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BICUBIC)
    if kind == "shift2":
        dx, dy = int(rng.choice([-2, 2])), int(rng.choice([-2, 2]))
        arr = np.pad(np.asarray(tile), ((2, 2), (2, 2), (0, 0)), mode="edge")
        return Image.fromarray(arr[2 - dy:2 - dy + h, 2 - dx:2 - dx + w])
    if kind == "crop5":
        cw, ch = round(w * 0.95), round(h * 0.95)
        x0, y0 = int(rng.choice([0, w - cw])), int(rng.choice([0, h - ch]))
        return tile.crop((x0, y0, x0 + cw, y0 + ch))
    raise ValueError(kind)


def photo_set(photos: Path, root: Path, per_kind: int = 10, seed: int = 0) -> dict[str, int]:
    """Tiles and their near copies into root; returns {file: group} (-1 = no copy)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    tiles = []
    for name in PHOTOS:
        img = Image.open(photos / name).convert("RGB")
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)
        for y in range(0, img.height - 63, 64):
            for x in range(0, img.width - 63, 64):
                tiles.append((f"{Path(name).stem}_{y:03d}_{x:03d}.png", img.crop((x, y, x + 64, y + 64))))
    truth, by_pixels = {}, {}
    for k, (name, tile) in enumerate(tiles):
        tile.save(root / name)
        truth[name] = by_pixels.setdefault(tile.tobytes(), -2 - k)  # identical tiles share a group
    chosen = rng.choice(len(tiles), per_kind * len(KINDS), replace=False)
    for j, k in enumerate(chosen):
        name, tile = tiles[k]
        kind = KINDS[j // per_kind]
        copy = f"{Path(name).stem}__{kind}.png"
        copy_of(tile, kind, rng).save(root / copy)
        truth[copy] = truth[name]
    return indistinguishable(root, truth)


def indistinguishable(root: Path, truth: dict[str, int], levels: int = 4) -> dict[str, int]:
    """The groups with images no person can tell apart joined: every pixel within `levels` of
    the other's (the black corners of the retina photograph, 0-4 levels, are such tiles)."""
    names = sorted(truth)
    pixels = np.stack([np.asarray(Image.open(root / n).convert("RGB").resize((64, 64)), np.int16) for n in names])
    group = {n: truth[n] if truth[n] != -1 else -100_000 - k for k, n in enumerate(names)}
    for a in range(len(names)):
        close = np.flatnonzero(np.abs(pixels[a + 1:] - pixels[a]).max(axis=(1, 2, 3)) <= levels) + a + 1
        for b in close:
            old, new = group[names[b]], group[names[a]]
            group = {n: (new if g == old else g) for n, g in group.items()}
    sizes: dict[int, int] = {}
    for g in group.values():
        sizes[g] = sizes.get(g, 0) + 1
    return {n: (g if sizes[g] > 1 else -1) for n, g in group.items()}


def pair_stats(truth: dict[str, int], ids: list[str], cluster: np.ndarray) -> dict[str, float]:
    g = np.array([truth[i] for i in ids])
    true = (g[:, None] == g[None, :]) & (g[:, None] != -1)
    pred = (cluster[:, None] == cluster[None, :]) & (cluster[:, None] >= 0)
    off = np.triu(np.ones((len(ids), len(ids)), dtype=bool), 1)
    tp = int((true & pred & off).sum())
    return {"precision": tp / max(int((pred & off).sum()), 1), "recall": tp / max(int((true & off).sum()), 1),
            "false_pairs": int((pred & ~true & off).sum()), "true_pairs": int((true & off).sum())}


def recall_by_kind(truth: dict[str, int], ids: list[str], cluster: np.ndarray) -> dict[str, str]:
    at = {i: k for k, i in enumerate(ids)}
    out = {}
    for kind in KINDS:
        copies = [i for i in ids if i.endswith(f"__{kind}.png")]
        found = sum(cluster[at[c]] >= 0 and cluster[at[c]] == cluster[at[c.split("__")[0] + ".png"]] for c in copies)
        out[kind] = f"{found}/{len(copies)}"
    return out


def phash(img: Image.Image) -> np.ndarray:
    """imagededup's PHash: 32x32 grey (ANTIALIAS), 2-D DCT, top-left 8x8, bits above the median."""
    from scipy.fft import dctn

    a = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    low = dctn(a, norm="ortho")[:8, :8]
    return (low > np.median(low)).ravel()


def phash_clusters(root: Path, ids: list[str], max_distance: int = 10) -> np.ndarray:
    from pipeline.decide.clusters import UnionFind

    h = np.array([phash(Image.open(root / i)) for i in ids])
    dist = (h[:, None, :] != h[None, :, :]).sum(-1)
    uf = UnionFind(len(ids))
    for a, b in zip(*np.where(np.triu(dist <= max_distance, 1))):
        uf.union(int(a), int(b))
    roots = np.array([uf.find(i) for i in range(len(ids))])
    counts = np.bincount(roots, minlength=len(ids))
    return np.where(counts[roots] > 1, roots, -1)


def previous_embedder(image_side: int) -> PixelEmbedder:
    """The pixel embedder before zooms, the detail check and the flat-image guard (memclean
    1325649): thumbnail correlation over shifts only."""
    emb = PixelEmbedder(image_side=image_side)
    emb.zooms, emb.detail_weight, emb.flat_std = (1.0,), 0.0, 1e-12
    return emb


def memclean_clusters(root: Path, image_size: int = 64, channels: int = 3, threshold: float = 0.95,
                      previous: bool = False) -> tuple[list[str], np.ndarray, float]:
    """What `memclean dedup --image-size 64` clusters (same decode, embedder and search)."""
    import torch

    t0 = time.perf_counter()
    decoded = [d for b in batched(discover(root), ImageSpec(channels, (image_size, image_size)), 256) for d in b]
    emb = previous_embedder(image_size) if previous else PixelEmbedder(image_side=image_size, channels=channels)
    v = emb(torch.stack([d.pixels for d in decoded])).numpy()
    ids = [d.item.id for d in decoded]
    c = find_clusters(v, [d.pixel_sha256 for d in decoded], np.zeros(len(ids)), ids, threshold, emb)
    return ids, c.cluster, time.perf_counter() - t0


def digits_truth() -> dict[str, int]:
    import csv

    rows = csv.DictReader(open(REPO / "examples/digits/planted.csv"))
    groups = {r["file"].split("/", 1)[1]: int(r["group"]) for r in rows}
    return {p.name: groups.get(p.name, -1) for p in (REPO / "examples/digits/train").glob("*.png")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=Path.home() / ".cache/memclean-bench/photos")
    ap.add_argument("--wheels", type=Path, help="extract the photos from scikit-image/scikit-learn wheels here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="which tiles get copies, and how")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.wheels:
        extract(args.wheels, args.photos)
    missing = [p for p in PHOTOS if not (args.photos / p).exists()]
    if missing:
        sys.exit(f"photos missing from {args.photos}: {missing} (see --wheels)")
    lines = ["| set | method | images | true pairs | precision | recall | false pairs | "
             + " | ".join(KINDS) + " | s |", "|---" * (8 + len(KINDS)) + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        sets = [(f"photos, seed {seed}", Path(tmp) / f"photos{seed}", photo_set, seed) for seed in args.seeds]
        sets += [(f"scenes, seed {seed}", Path(tmp) / f"scenes{seed}", None, seed) for seed in args.seeds]
        for label, root, make, seed in sets:
            truth = make(args.photos, root, seed=seed) if make else planted_set(root, n_unique=300, n_groups=25,
                                                                                  seed=seed)
            ids, cluster, seconds = memclean_clusters(root)
            _, before, _ = memclean_clusters(root, previous=True)
            for method, cl, s in (("memclean pixel", cluster, seconds), ("memclean pixel before", before, None),
                                  ("pHash <= 10", phash_clusters(root, ids), None)):
                st = pair_stats(truth, ids, cl)
                kinds = recall_by_kind(truth, ids, cl) if make else {k: "" for k in KINDS}
                lines.append(f"| {label} | {method} | {len(ids)} | {st['true_pairs']} | {st['precision']:.3f} | "
                             f"{st['recall']:.3f} | {st['false_pairs']} | " + " | ".join(kinds.values())
                             + f" | {'' if s is None else f'{s:.1f}'} |")
                print(lines[-1], flush=True)
        truth = digits_truth()  # the demo's 16x16 digits, at the default threshold and the demo's
        for threshold in (0.95, 0.985):
            for method, previous in (("memclean pixel", False), ("memclean pixel before", True)):
                ids, cl, s = memclean_clusters(REPO / "examples/digits/train", 16, 1, threshold, previous)
                st = pair_stats(truth, ids, cl)
                lines.append(f"| demo digits at {threshold} | {method} | {len(ids)} | {st['true_pairs']} | "
                             f"{st['precision']:.3f} | {st['recall']:.3f} | {st['false_pairs']} |"
                             + " |" * len(KINDS) + f" {s:.1f} |")
                print(lines[-1], flush=True)
    text = "\n".join(["## Near duplicates on photographs (`benchmarks/near_duplicates.py`)", "",
                      f"Hardware: {hardware()}. Photos: {len(PHOTOS)} test photographs from the scikit-image and "
                      "scikit-learn wheels, halved, cut into 64x64 tiles, 10 copies of each kind; scenes: "
                      "tests/planted.py (300 unique, 25 groups). Pairwise precision and recall of the clusters; "
                      "per kind: copies joined to their tile.", "", *lines])
    print(text)
    if not args.no_write:
        write_section("near-duplicates", text)


if __name__ == "__main__":
    main()
