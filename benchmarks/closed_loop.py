"""The closed loop on the demo: retrain on what `memclean demo` keeps, and count memorized
generations, for each fate of a duplicate cluster whose flagged keeper found no accepted variant.

    .venv/bin/python benchmarks/closed_loop.py [--samples 1000] [--steps N] [--no-write]

1. cleans the demo's training set with `memclean demo`'s settings (the defaults, the held-out
   split as the reference);
2. builds the training set each fate gives: `drop` (--cluster-on-failure failure with
   --on-failure drop: the cluster leaves the dataset, cleaned/ as that run writes it) and `keep`
   (that cleaned/ plus each failed keeper's original image, one picture per cluster: what the
   default --cluster-on-failure keep writes);
3. trains a model on each with the shipped recipe (examples/model/training.json) and counts
   memorized generations (the nearest training image, of the ORIGINAL training set, closer than
   1/3 of the second-nearest distinct one, L2; copies count as one image), in all and of the
   failed clusters' pictures, next to the shipped model (the same recipe on the original set).
Alone on the machine: two trainings of 12-19 minutes each on 2 cores. Writes its section of
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.evidence import flat, load_pipeline, planted_groups  # noqa: E402
from benchmarks.results import hardware, publish  # noqa: E402
from memclean.cli import demo_parameters  # noqa: E402
from pipeline.io.data import ImageSpec, discover  # noqa: E402
from pipeline.run.lifecycle import run_clean  # noqa: E402
from pipeline.run.settings import RunSettings  # noqa: E402
from pipeline.tools.evaluate import generate, memorized  # noqa: E402
from pipeline.tools.train import TrainSettings, load_images, train  # noqa: E402


def count(unet, scheduler, n: int, train_x: np.ndarray, group: np.ndarray, failed_groups: set[str]) -> dict:
    samples = generate(unet, dict(scheduler.config), n, seed=0).flatten(1).numpy()
    m = memorized(samples, train_x, groups=group)
    copied = [group[r] for r in np.asarray(m["nearest"])[np.flatnonzero(m["mask"])]]
    return {"count": m["count"], "distinct": m["copied_images"],
            "of_failed_clusters": sum(g in failed_groups for g in copied)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped recipe's)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    demo = demo_parameters(REPO)
    model_dir, data = Path(demo["model"]), Path(demo["data"])
    unet, scheduler = load_pipeline(model_dir)
    spec = ImageSpec(unet.config.in_channels, (unet.config.sample_size,) * 2)
    work = Path(tempfile.mkdtemp(prefix="memclean-closed-loop-"))
    manifest = run_clean(RunSettings.from_flat({**demo, "out": str(work / "clean"), "cluster_on_failure": "failure"}))
    rows = pq.read_table(work / "clean" / "scores.parquet").to_pylist()
    failed = [r for r in rows if r["augment_tries"] is not None and r["action"] != "augmented"
              and r["dup_cluster"] is not None and r["dup_of"] is None]  # keepers that found no variant
    ids, x_train = flat(str(data), spec)
    group = planted_groups(data, ids)
    at = {i: k for k, i in enumerate(ids)}
    failed_groups = {group[at[r["id"]]] for r in failed}
    in_failed = sum(1 for r in rows if r["dup_cluster"] in {f["dup_cluster"] for f in failed})
    train_x = x_train.flatten(1).numpy()

    cleaned = load_images(discover(str(work / "clean" / "cleaned")), spec)
    keep_one = torch.cat([cleaned, x_train[[at[r["id"]] for r in failed]]]) if failed else cleaned
    recipe = json.loads((model_dir / "training.json").read_text())
    ts = dict(recipe["settings"], block_out_channels=tuple(recipe["settings"]["block_out_channels"]))
    if args.steps:
        ts["steps"] = args.steps
    results = [("original set (the shipped model)", len(ids), None,
                count(unet, scheduler, args.samples, train_x, group, failed_groups))]
    for name, images in (("drop (--cluster-on-failure failure)", cleaned),
                         ("keep (--cluster-on-failure keep, the default)", keep_one)):
        t1 = time.time()
        path = train(images, work / name.split()[0], TrainSettings(**ts))  # drop/ and keep/
        u, s = load_pipeline(path)
        results.append((name, len(images), time.time() - t1, count(u, s, args.samples, train_x, group, failed_groups)))
        print(name, results[-1], flush=True)
    lines = ["| training set | images | share of the 540 inputs | memorized generations | distinct pictures copied | "
             "of the failed clusters' pictures | training s |", "|---" * 7 + "|"]
    for name, n, s, c in results:
        lines.append(f"| {name} | {n} | {n / len(ids):.0%} | {c['count']} / {args.samples} | {c['distinct']} | "
                     f"{c['of_failed_clusters']} | {'' if s is None else f'{s:.0f}'} |")
    text = (f"Hardware: {hardware()}; {time.time() - t0:.0f} s in all. The demo cleaned at the defaults but "
            "--cluster-on-failure failure "
            f"({manifest['counts']}); {len(failed)} duplicate clusters ({in_failed} pictures) had a flagged keeper "
            f"that found no accepted variant. Each model: the shipped recipe ({ts['steps']} steps, seed {ts['seed']}); "
            f"{args.samples} DDIM generations, seed 0.\n\n" + "\n".join(lines))
    publish("closed-loop", "The closed loop: `benchmarks/closed_loop.py`", text, write=not args.no_write)


if __name__ == "__main__":
    main()
