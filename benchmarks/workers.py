"""Several scoring processes on one machine: aggregate images/s of the flow `clean` with 1, 2
and 4 Dask LocalCluster workers, against the default (one process, shards one after another).

    .venv/bin/python benchmarks/workers.py [--images 1080] [--workers 1 2 4]

Each worker is given cores / workers torch threads (flows/clean.py: task_runner_for; without
that, every worker's torch takes every core, and two processes on 2 cores were measured 26x
slower in aggregate), and runs without the MALLOC_TRIM_THRESHOLD_ Dask's nanny sets (with it,
every shard scored 1.6x slower). The demo model and images (its 540 training digits, twice under other
names so nothing is a cache hit), the default solver, no cache, shards of 64. Images/s is over
the scoring stage (the manifest's timings: the cluster's start-up and the model loads in each
worker are inside it). Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.results import hardware, write_section  # noqa: E402

FLOW = "import sys, json; from flows.clean import clean; clean(**json.loads(sys.argv[1]))"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1080)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    src = sorted((REPO / "examples/digits/train").glob("*.png"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for i in range(args.images):
            shutil.copy(src[i % len(src)], data / f"{i:06d}.png")
        runs = [("threads (default)", {"task_runner": "threads"})] + \
            [(f"dask, {w} worker{'s' if w > 1 else ''}", {"task_runner": "dask", "dask_workers": w}) for w in args.workers]
        for label, extra in runs:
            out = Path(tmp) / f"out-{len(rows)}"
            params = {"data": str(data), "model": str(REPO / "examples/model"), "out": str(out), "no_cache": True,
                      "shard_size": 64, "action": "none", **extra}
            env = {**os.environ, "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true", "PREFECT_LOGGING_LEVEL": "WARNING"}
            subprocess.run([sys.executable, "-c", FLOW, json.dumps(params)], check=True, cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            m = json.loads((out / "manifest.json").read_text())
            s = m["scoring"]["by_source"]["input"]
            rows.append(f"| {label} | {s['fresh']} | {s['seconds']:.1f} | {s['images_per_s']:.1f} |")
            print(rows[-1], flush=True)
    text = "\n".join(["## Workers: `benchmarks/workers.py`", "",
                      f"{hardware()}; {os.cpu_count()} cores. The flow `clean` on {args.images} demo digits, default "
                      "solver, no cache, shards of 64; each Dask worker gets cores / workers torch threads. "
                      "Seconds and images/s of the scoring stage, including the cluster's start-up and each "
                      "worker's model load.", "",
                      "| task runner | images | scoring seconds | aggregate images/s |", "|---|---|---|---|", *rows])
    print(text)
    if not args.no_write:
        write_section("workers", text)


if __name__ == "__main__":
    main()
