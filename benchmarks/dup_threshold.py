"""The duplicate threshold judged against chance (`--dup-threshold auto`) against a fixed 0.95,
on planted sets where the right answer is known.

    .venv/bin/python benchmarks/dup_threshold.py [--photos DIR] [--seeds 0 1 2] [--no-write]

Sets: the demo's digits (examples/digits, its held-out digits as the reference); a second
digits set that is not the demo's (other scikit-learn digits: 300 unique, 10 of them copied 30
times, 30 near copies made by JPEG q75, +8% brightness or a 1-pixel shift, 200 held-out as the
reference), as issue 25 describes it; the photo evidence set (examples/photos, 32x32 tiles, its
held-out tiles as the reference); 64x64 tiles of the package photographs with six kinds of near
copy (benchmarks/near_duplicates.py, no reference); generated scenes (tests/planted.py, no
reference). Each is clustered as a clean run clusters (the pixel embedder, find_clusters at the
threshold chosen by decide/chance.py's threshold_by_chance, the same code the run calls).
Pairwise precision and recall of the clusters against the planted groups; writes its section
of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))
from benchmarks.near_duplicates import PHOTOS, pair_stats, photo_set, recall_by_kind  # noqa: E402
from benchmarks.results import hardware, publish  # noqa: E402
from make_digits import upscale  # noqa: E402
from pipeline.decide.chance import threshold_by_chance  # noqa: E402
from pipeline.decide.clusters import DedupSettings, find_clusters  # noqa: E402
from pipeline.decide.embeddings import PixelEmbedder  # noqa: E402
from pipeline.decide.index import build_index, search_views  # noqa: E402
from pipeline.io.data import ImageSpec, batched, discover  # noqa: E402
from tests.planted import planted_set  # noqa: E402

RATE = DedupSettings().dup_false_join_rate  # the default


def embed(root: Path, side: int, channels: int) -> tuple[list[str], np.ndarray, list[str], PixelEmbedder]:
    decoded = [d for b in batched(discover(str(root)), ImageSpec(channels, (side, side)), 256) for d in b]
    emb = PixelEmbedder(image_side=side, channels=channels)
    v = emb(torch.stack([d.pixels for d in decoded])).numpy()
    return [Path(d.item.id).name for d in decoded], v, [d.pixel_sha256 for d in decoded], emb


def planted_truth(root: Path) -> dict[str, int]:
    rows = csv.DictReader(open(root / "planted.csv"))
    groups = {r["file"].split("/", 1)[1]: int(r["group"]) for r in rows}
    return {p.name: groups.get(p.name, -1) for p in (root / "train").glob("*.png")}


def load_digits(wheels: Path) -> np.ndarray:
    """scikit-learn's 1,797 8x8 digits: from sklearn when installed, else read from its wheel in
    `wheels` (datasets/data/digits.csv.gz, as load_digits reads it)."""
    try:
        from sklearn.datasets import load_digits as sk_load
        return sk_load().images
    except ImportError:
        import gzip
        import zipfile
        wheel = next(iter(sorted(wheels.glob("scikit_learn-*.whl"))), None)
        if wheel is None:
            sys.exit(f"scikit-learn is not installed and no scikit_learn wheel is in {wheels} "
                     "(pip download scikit-learn --no-deps -d DIR)")
        with zipfile.ZipFile(wheel) as z:
            raw = gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz"))
        data = np.loadtxt(io.StringIO(raw.decode()), delimiter=",")
        return data[:, :64].reshape(-1, 8, 8)


def digits_second(root: Path, digits: np.ndarray, seed: int = 7) -> dict[str, int]:
    """Issue 25's second digits set, from scikit-learn digits the demo does not use."""
    rng = np.random.default_rng(seed)
    demo = np.random.default_rng(0).permutation(len(digits))[:300 + 16 + 200]  # examples/make_digits.py's draw
    rest = rng.permutation(np.setdiff1d(np.arange(len(digits)), demo))
    unique, heldout = rest[:300], rest[300:500]
    (root / "train").mkdir(parents=True)
    (root / "heldout").mkdir()
    truth = {}
    for i, k in enumerate(unique):
        upscale(digits[k]).save(root / "train" / f"u{i:04d}.png")
        truth[f"u{i:04d}.png"] = -1
    for i, k in enumerate(heldout):
        upscale(digits[k]).save(root / "heldout" / f"h{i:04d}.png")
    for g in range(10):  # 10 digits copied 30 times
        truth[f"u{g:04d}.png"] = g
        for c in range(30):
            upscale(digits[unique[g]]).save(root / "train" / f"e{g:02d}_c{c:02d}.png")
            truth[f"e{g:02d}_c{c:02d}.png"] = g
    for j in range(30):  # 30 near copies of 30 other digits
        g = 10 + j
        base = upscale(digits[unique[g]])
        kind = ("jpeg75", "brightness8", "shift1")[j % 3]
        if kind == "jpeg75":
            buf = io.BytesIO()
            base.save(buf, "JPEG", quality=75)
            copy = Image.open(io.BytesIO(buf.getvalue())).convert("L")
        elif kind == "brightness8":
            copy = ImageEnhance.Brightness(base).enhance(1.08)
        else:
            a = np.pad(np.asarray(base), 1, mode="edge")
            dy, dx = rng.choice([-1, 1], 2)
            copy = Image.fromarray(a[1 - dy:1 - dy + 16, 1 - dx:1 - dx + 16])
        copy.save(root / "train" / f"n{g:02d}_{kind}.png")
        truth[f"u{g:04d}.png"] = g
        truth[f"n{g:02d}_{kind}.png"] = g
    return truth


def measure(label: str, root: Path, truth: dict[str, int], side: int, channels: int,
            reference: Path | None) -> list[str]:
    ids, v, hashes, emb = embed(root, side, channels)
    views = search_views(v, emb.search_view)
    index = build_index(views)
    ref = embed(reference, side, channels)[1] if reference is not None else None
    lines = []
    ways = [("auto, reference", ref)] if ref is not None else []
    ways += [("auto, dataset", None), ("0.95", "given")]
    for name, r in ways:
        t0 = time.perf_counter()
        if isinstance(r, str):
            threshold, source = 0.95, "given"
        else:
            t = threshold_by_chance(v, hashes, index, views, emb, RATE, r, None, ids)
            threshold, source = t.value, f"fit {t.fitted:.4f}, {t.sample} draws" if t.fitted is not None else t.note
        c = find_clusters(v, hashes, np.zeros(len(ids)), ids, threshold, emb, index=index, views=views)
        seconds = time.perf_counter() - t0
        p = pair_stats(truth, ids, c.cluster)
        kinds = recall_by_kind(truth, ids, c.cluster) if label.startswith("tiles") else {}
        lines.append(f"| {label} | {name} | {threshold:.4f} ({source}) | {len(ids)} | {p['true_pairs']} | "
                     f"{p['precision']:.3f} | {p['recall']:.3f} | {p['false_pairs']} | "
                     f"{' '.join(f'{k} {x}' for k, x in kinds.items())} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=Path.home() / ".cache/memclean-bench/photos",
                    help="the package photographs (benchmarks/near_duplicates.py --wheels extracts them)")
    ap.add_argument("--wheels", type=Path, default=Path.home() / ".cache/memclean-bench/wheels",
                    help="where scikit-learn's wheel is, when sklearn is not installed (for its digits)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = ["| set | threshold | value (how) | images | true pairs | precision | recall | false pairs | "
             "tiles: copies joined by kind | s |", "|---" * 10 + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines += measure("demo digits", REPO / "examples/digits/train", planted_truth(REPO / "examples/digits"), 16, 1,
                         REPO / "examples/digits/heldout")
        truth = digits_second(tmp / "digits2", load_digits(args.wheels))
        lines += measure("second digits", tmp / "digits2/train", truth, 16, 1, tmp / "digits2/heldout")
        lines += measure("photo evidence set", REPO / "examples/photos/train", planted_truth(REPO / "examples/photos"),
                         32, 3, REPO / "examples/photos/heldout")
        have_photos = all((args.photos / p).exists() for p in PHOTOS)
        for seed in args.seeds:
            if have_photos:
                truth = photo_set(args.photos, tmp / f"tiles{seed}", seed=seed)
                lines += measure(f"tiles 64x64, seed {seed}", tmp / f"tiles{seed}", truth, 64, 3, None)
            truth = planted_set(tmp / f"scenes{seed}", n_unique=300, n_groups=25, seed=seed)
            lines += measure(f"scenes, seed {seed}", tmp / f"scenes{seed}", truth, 64, 3, None)
    text = (f"Hardware: {hardware()}. False-join rate {RATE} (the default); the pixel embedder, floor "
            f"{PixelEmbedder.threshold_floor}. 'auto, reference': chance measured on the held-out images against the "
            "training set; 'auto, dataset': on the dataset's own nearest neighbours (exact copies left out); 0.95: the "
            "fixed default before. Pairwise precision and recall of the planted groups.\n\n" + "\n".join(lines))
    publish("dup-threshold", "The duplicate threshold against chance: `benchmarks/dup_threshold.py`", text, write=not args.no_write)


if __name__ == "__main__":
    main()
