"""The fault suite's long version: `memclean clean` and the Prefect flow `clean` killed with
SIGKILL at random moments, many times, each restart resuming from the score cache; the final
outputs must equal an uninterrupted run's, and nothing half-written may ever be visible.

    .venv/bin/python benchmarks/faults.py [--kills 20] [--images 60] [--flow-kills 20]

For each kill: a run starts on the same --out and --cache-dir, is killed after a random delay
(uniform over an uninterrupted run's duration), and the output path is checked (absent, or a
complete earlier output, never a partial one) and every cache file read back (a torn one must
be ignored, never trusted). Then a last run completes, and benchmarks/compare_outputs.py
compares it with a run that was never killed. Writes its section of benchmarks/RESULTS.md.
The short version is in the test suite (tests/test_lifecycle.py: a SIGKILL and a simulated
crash, each resumed once).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.compare_outputs import differences  # noqa: E402
from benchmarks.results import hardware, write_section  # noqa: E402

MEMCLEAN = str(Path(sys.executable).with_name("memclean"))
FLOW = ("import sys, json; from flows.clean import clean; "
        "clean(**json.loads(sys.argv[1]))")


def make_inputs(root: Path, n: int) -> tuple[Path, Path]:
    """n random 16x16 images (a few duplicated) and a tiny random DDPM."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 256, (16, 16), dtype=np.uint8) if i % 10 else np.full((16, 16), i, np.uint8)
        Image.fromarray(arr, "L").save(data / f"{i:05d}.png")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    model = root / "model"
    unet.save_pretrained(model)
    DDPMScheduler().save_pretrained(model)
    return data, model


def command(kind: str, data: Path, model: Path, out: Path, cache: Path | None) -> list[str]:
    common = {"data": str(data), "model": str(model), "out": str(out), "solver": "heun", "steps": 16,
              "batch_size": 4, "shard_size": 4, "overwrite": True}
    if kind == "cli":
        args = [MEMCLEAN, "clean", "--data", str(data), "--model", str(model), "--out", str(out), "--solver",
                "heun", "--steps", "16", "--batch-size", "4", "--shard-size", "4", "--overwrite"]
        return args + (["--cache-dir", str(cache)] if cache else ["--no-cache"])
    import json

    params = {**common, **({"cache_dir": str(cache)} if cache else {"no_cache": True})}
    return [sys.executable, "-c", FLOW, json.dumps(params)]


def run(cmd: list[str], timeout: float | None = None) -> tuple[int, float]:
    t0 = time.perf_counter()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout, env=env, cwd=REPO)
    return p.returncode, time.perf_counter() - t0


def torn_cache_files(cache: Path) -> int:
    """Cache files that do not read back as Parquet (a killed writer's): they are ignored."""
    import pyarrow.parquet as pq

    bad = 0
    for f in cache.rglob("*.parquet"):
        try:
            pq.read_table(f)
        except Exception:
            bad += 1
    return bad


def kill_loop(kind: str, data: Path, model: Path, root: Path, kills: int, duration: float) -> dict:
    """Kill `kills` runs at random moments, then let one finish; check the output each time."""
    out, cache = root / f"{kind}-out", root / f"{kind}-cache"
    rng = random.Random(kind)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}
    partial_seen, torn, orphans = 0, 0, 0
    for _ in range(kills):
        proc = subprocess.Popen(command(kind, data, model, out, cache), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
        time.sleep(rng.uniform(0.05, duration))
        os.kill(proc.pid, signal.SIGKILL)  # the run's own process, as the OOM killer would
        proc.wait()
        time.sleep(0.5)
        # what the killed process left running (an ephemeral Prefect server, Dask workers):
        # counted, then killed so that it does not slow the next run
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _in_group(p, proc.pid)]
        orphans += len(left)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        if out.exists() and not (out / "_COMPLETE").is_file():
            partial_seen += 1
        torn += torn_cache_files(cache)
    rc, secs = run(command(kind, data, model, out, cache))
    return {"out": out, "rc": rc, "partial_seen": partial_seen, "torn_cache_files": torn, "last_run_s": secs,
            "orphans": orphans}


def _in_group(proc_dir: Path, pgid: int) -> bool:
    try:
        return os.getpgid(int(proc_dir.name)) == pgid
    except (OSError, ValueError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs of memclean clean")
    ap.add_argument("--flow-kills", type=int, default=20, help="SIGKILLs of the Prefect flow")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="memclean-faults-"))
    try:
        data, model = make_inputs(root, args.images)
        rows = []
        for kind, kills in (("cli", args.kills), ("flow", args.flow_kills)):
            if not kills:
                continue
            rc, duration = run(command(kind, data, model, root / f"{kind}-ref", None))
            assert rc == 0, f"the uninterrupted {kind} run failed"
            r = kill_loop(kind, data, model, root, kills, duration)
            diff = differences(root / f"{kind}-ref", r["out"]) if r["rc"] == 0 else ["the last run failed"]
            rows.append(f"| {kind} | {kills} | {duration:.1f} | {r['partial_seen']} | {r['torn_cache_files']} "
                        f"| {r['orphans']} | {r['rc']} | {len(diff)} |")
            print(rows[-1], *diff[:5], sep="\n", flush=True)
        text = "\n".join([
            "## Faults: `benchmarks/faults.py`", "",
            f"{args.images} images, a tiny random DDPM, Heun-16 in shards of 4; {hardware()}. Each kill is a "
            "SIGKILL after a random delay, uniform over an uninterrupted run's time; every run after the "
            "first resumes from the score cache of those before it.", "",
            "| what was killed | kills | uninterrupted run (s) | partial outputs seen | torn cache files found "
            "(ignored) | processes the killed run left running | last run's exit code | differences from the "
            "uninterrupted run |", "|---|---|---|---|---|---|---|---|", *rows, "",
            "A flow run in Prefect's ephemeral mode starts its own API server process; SIGKILL of the run "
            "leaves that server running (nothing can clean up after SIGKILL). The suite counts and then "
            "kills them; deployments run against a long-lived `prefect server start` have none."])
        print(text)
        if not args.no_write:
            write_section("faults", text)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
