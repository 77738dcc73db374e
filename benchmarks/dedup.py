"""Flat vs IVF range search for duplicate finding: time and recall by dataset size.

    .venv/bin/python benchmarks/dedup.py [--sizes 5000 20000 50000] [--dim 1024]

Vectors are unit-normalised, drawn around n/20 random centres (so that, like real image
embeddings, they have cluster structure for IVF to exploit), with planted near copies (1% of
rows, cosine ~0.98 to their original), the shape of the pixel embedder's search view. For
each size it reports seconds for the whole self range search (query batches of 4,096) with
the exact IndexFlatIP and with the IVF index memclean switches to above dedup.FLAT_MAX, the
IVF's recall of the flat index's pairs, and the flat search's seconds per image (it grows
linearly in n: compare it with the seconds per image that scoring costs). Ratios, not
absolute times, are what carry over.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.decide.index import FLAT_MAX, build_index  # noqa: E402
from pipeline.decide.neighbours import range_pairs  # noqa: E402


def vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(max(1, n // 20), d)).astype(np.float32)
    v = centres[rng.integers(0, len(centres), n)] + 1.5 * rng.normal(size=(n, d)).astype(np.float32)
    k = max(1, n // 100)
    v[-k:] = v[:k] + 0.2 * rng.normal(size=(k, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def pairs(kind: str, v: np.ndarray, threshold: float) -> tuple[set, float]:
    t0 = time.perf_counter()
    index = build_index(v, kind)
    found = {(int(a), int(b)) for r, c, _ in range_pairs(index, v, threshold) for a, b in zip(r, c) if a < b}
    return found, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--threshold", type=float, default=0.9)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"FLAT_MAX = {FLAT_MAX}")
    print("| n | flat s | ivf s | ivf/flat time | ivf recall | flat ms per image |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        v = vectors(n, args.dim, rng)
        flat, tf = pairs("flat", v, args.threshold)
        ivf, ti = pairs("ivf", v, args.threshold)
        recall = len(flat & ivf) / max(len(flat), 1)
        print(f"| {n} | {tf:.2f} | {ti:.2f} | {ti / tf:.3f} | {recall:.3f} | {1000 * tf / n:.2f} |", flush=True)


if __name__ == "__main__":
    main()
