"""Peak memory of `memclean clean` on 2,000 vs 20,000 small images (issue 3).

    .venv/bin/python benchmarks/memory.py [--small 2000] [--large 20000]

Each run is a fresh subprocess; its peak RSS comes from getrusage. Decoding is streamed in
batches, so peak RSS should stay flat while the image count grows tenfold. Prints both numbers
and their ratio. Uses a tiny random UNet and the cheapest solver: this measures the pipeline's
memory, not the model's.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        sub = root / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(sub / f"{i:06d}.png")


def make_model(path: Path) -> None:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(path)
    DDPMScheduler().save_pretrained(path)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd` in a child (a fresh `python -c` wrapper) and return (peak RSS MB, seconds)."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=20000)
    args = ap.parse_args()
    memclean = str(Path(sys.executable).with_name("memclean"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        results = {}
        for n in (args.small, args.large):
            make_images(tmp / f"data{n}", n)
            rss, secs = peak_rss_mb([memclean, "clean", "--data", str(tmp / f"data{n}"), "--model",
                                     str(tmp / "model"), "--out", str(tmp / f"out{n}"), "--solver",
                                     "euler", "--steps", "1", "--batch-size", "64"])
            results[n] = rss
            print(f"{n:>6} images: peak RSS {rss:7.1f} MB, {secs:6.1f} s")
        ratio = results[args.large] / results[args.small]
        print(f"peak RSS ratio {args.large}/{args.small} images: {ratio:.3f}")


if __name__ == "__main__":
    main()
