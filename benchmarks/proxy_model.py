"""A second small model for the benchmarks, unlike the demo: RGB scenes (blobs over gradients
with 1/f texture, tests/planted.py) at 16x16, a cosine (squaredcos_cap_v2) schedule, and 12
scenes duplicated 8 times each among 240 unique ones; 150 held-out scenes it never sees.

    .venv/bin/python benchmarks/proxy_model.py [--out ~/.cache/memclean-bench/scenes] [--steps 1500]

Writes OUT/train, OUT/heldout and OUT/model (memclean train; about 10 minutes on 2 cores), then
prints the scoring benchmark's command for it. Nothing here is committed or downloaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from memclean.cli import main as memclean  # noqa: E402
from tests.planted import scene  # noqa: E402


def write_scenes(root: Path, unique: int, groups: int, copies: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(unique):
        scene(rng, 64).resize((16, 16)).save(root / f"u{i:04d}.png")
    for g in range(groups):
        base = scene(rng, 64).resize((16, 16))
        for c in range(copies):
            base.save(root / f"d{g:02d}_c{c:02d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "memclean-bench" / "scenes")
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    write_scenes(args.out / "train", 240, 12, 8, seed=0)
    write_scenes(args.out / "heldout", 150, 0, 0, seed=1)
    rc = memclean(["train", "--data", str(args.out / "train"), "--out", str(args.out / "model"), "--overwrite",
                   "--sample-size", "16", "--channels", "3", "--block-out-channels", "32", "64", "64",
                   "--steps", str(args.steps), "--batch-size", "64", "--lr", "1e-3", "--seed", "0",
                   "--beta-schedule", "squaredcos_cap_v2"])
    print(f".venv/bin/python benchmarks/scoring.py --model {args.out / 'model'} --members {args.out / 'train'} "
          f"--heldout {args.out / 'heldout'} --name scenes --n 100")
    sys.exit(rc)


if __name__ == "__main__":
    main()
