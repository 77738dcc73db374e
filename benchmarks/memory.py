"""Peak memory of a whole clean run as the input grows: 2,000, 20,000 and 100,000 small images.

    .venv/bin/python benchmarks/memory.py [--sizes 2000 20000 100000] [--source parquet|folder]
                                          [--runner flow|cli] [--memory-limit MB]

Each run is a fresh subprocess whose memory is polled from /proc (anonymous and file-backed). Shards travel as
descriptors (a Parquet row range, never its bytes), decoding streams in batches, and the
duplicate search's vectors and views, FAISS's index (index.faiss) and the gathered score table
(an Arrow IPC file) are memory-mapped; what still grows with the input is the decision columns
and the score cache's arrays (a few hundred bytes an image). The score cache is on, as
by default, in a fresh folder per size. Uses a tiny random UNet and the cheapest solver: this measures the
pipeline's memory, not the model's. Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.results import hardware, write_section  # noqa: E402


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


def status_kb(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and VmRSS of a process, in KiB (Linux /proc)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


class MemoryCgroup:
    """A cgroup (v1 memory controller, or v2) whose memory limit, page cache included, is
    `limit_mb`: what a container with that much memory gives a run. Needs write access to
    /sys/fs/cgroup (root in most containers)."""

    def __init__(self, limit_mb: int, label: str):
        name = f"memclean-bench-{os.getpid()}-{label}"
        v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
        try:
            if v1.is_dir():
                self.path, limit, self.peak_file = v1 / name, "memory.limit_in_bytes", "memory.max_usage_in_bytes"
            else:
                self.path, limit, self.peak_file = v2 / name, "memory.max", "memory.peak"
            self.path.mkdir()
            try:
                (self.path / limit).write_text(str(limit_mb * 2**20))
            except OSError:
                self.path.rmdir()
                raise
        except OSError as e:
            raise SystemExit(f"--memory-limit needs a writable cgroup memory controller: {e}")

    def join(self) -> None:
        """Move the calling process into the cgroup (a child's preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float | None:
        try:  # cgroup v2's memory.peak needs Linux 5.19
            return int((self.path / self.peak_file).read_text()) / 2**20
        except OSError:
            return None

    def oom_kills(self) -> int:
        """Processes the cgroup's OOM killer killed (v1 memory.oom_control, v2 memory.events)."""
        for name in ("memory.oom_control", "memory.events"):
            try:
                for line in (self.path / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
            except OSError:
                continue
        return 0

    def remove(self) -> None:
        """Kill what is left in the cgroup (a killed run's Prefect server) and remove it."""
        import signal

        for _ in range(50):
            pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"could not remove {self.path}", file=sys.stderr)


def peak_rss_mb(cmd: list[str], cgroup: MemoryCgroup | None = None) -> tuple[dict[str, float], float]:
    """Run `cmd` (in `cgroup` when given) and poll its memory every 50 ms: peaks (MB) of its
    anonymous memory (what the process itself holds), of its file-backed pages (memory maps:
    the kernel can drop them) and of their sum; and the seconds it ran."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=cgroup.join if cgroup else None)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while child.poll() is None:
        for key, value in status_kb(child.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.05)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    return {k: v / 1024 for k, v in peak.items()}, time.perf_counter() - t0


def make_parquet(path: Path, n: int) -> None:
    """n random 16x16 PNGs as a Parquet file with a datasets Image column, 1,000 rows a row group."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, 1000):
            cells = []
            for i in range(start, min(start + 1000, n)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(buf, "PNG")
                cells.append({"bytes": buf.getvalue(), "path": f"{i:07d}.png"})
            w.write_table(pa.table({"image": cells}, schema))


FLOW = "import sys, json; from flows.clean import clean; clean(**json.loads(sys.argv[1]))"


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    ap.add_argument("--source", choices=("folder", "parquet"), default="parquet")
    ap.add_argument("--runner", choices=("cli", "flow"), default="flow")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--memory-limit", type=int, metavar="MB",
                    help="run each size in a cgroup with this memory limit, page cache included (as a container "
                         "would): the run must finish inside it; its section is memory-...-limited")
    args = ap.parse_args()
    memclean = str(Path(sys.executable).with_name("memclean"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        for n in args.sizes:
            data = tmp / f"data{n}" if args.source == "folder" else tmp / f"data{n}.parquet"
            (make_images if args.source == "folder" else make_parquet)(data, n)
            params = {"data": str(data), "model": str(tmp / "model"), "out": str(tmp / f"out{n}"), "solver": "euler",
                      "steps": 1, "batch_size": 64, "shard_size": 1024, "action": "dedup", "cache_dir": str(tmp / f"cache{n}")}
            cmd = [sys.executable, "-c", FLOW, json.dumps(params)] if args.runner == "flow" else \
                [memclean, "clean", *[f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                                      for k, v in params.items()]]
            cgroup = MemoryCgroup(args.memory_limit, str(n)) if args.memory_limit else None
            try:
                rss, secs = peak_rss_mb(cmd, cgroup)
                group_peak = cgroup.peak_mb() if cgroup else None
            except subprocess.CalledProcessError as e:
                if not cgroup:
                    raise
                why = f"killed by the OOM killer: it did not fit in {args.memory_limit} MB" if cgroup.oom_kills() \
                    else f"failed (exit {e.returncode})"
                rows.append(f"| {n:,} | {why} |" + " |" * 9)
                print(rows[-1], flush=True)
                continue
            finally:
                if cgroup:
                    cgroup.remove()
            m = json.loads((tmp / f"out{n}" / "manifest.json").read_text())
            held = m["held_mb"]
            rows.append(f"| {n:,} | {rss['RssAnon']:.0f} | {held['score']:.0f} | {held['flag_and_dedup']:.0f} | "
                        f"{max(held.values()):.0f} | {rss['RssFile']:.0f} | {rss['VmRSS']:.0f} | {secs:.0f} | "
                        f"{m['scoring']['by_source']['input']['images_per_s']:.0f} "
                        f"| {max(m['peak_rss_mb'].items(), key=lambda kv: kv[1])[0]} |"
                        + (f" {group_peak:.0f} |" if group_peak is not None else " |" if cgroup else ""))
            print(rows[-1], flush=True)
    limited = f" --memory-limit {args.memory_limit}" if args.memory_limit else ""
    text = "\n".join([f"## Memory: `benchmarks/memory.py --source {args.source} --runner {args.runner}{limited}`", "",
                      "Peak RSS of a whole clean run (Euler-1 on a tiny random DDPM, so the pipeline's memory and "
                      f"not a model's; --action dedup; the score cache on, as by default, empty at the start), {args.source} input, run by the {args.runner}; "
                      f"{hardware()}.", "",
                      "Memory of the run's own process, polled every 50 ms: anonymous (what it holds), "
                      "file-backed (resident pages of memory maps and libraries, which the kernel can drop) "
                      "and their sum.", "",
                      "Held: the anonymous memory the run holds at the end of a stage, once what the stage freed "
                      "is handed back to the OS (the manifest's `held_mb`): after scoring, after the decisions "
                      "(flags, duplicate search, clusters), and the most after any stage.", "",
                      *([f"Each run in a cgroup limited to {args.memory_limit} MB, page cache included, as a "
                         "container with that much memory: the kernel reclaims the memory maps' pages to stay "
                         "under it, and kills the run if what it holds does not fit. Cgroup peak: the most the "
                         "cgroup was charged.", ""] if args.memory_limit else []),
                      "| images | peak anonymous (MB) | held after scoring (MB) | held after decisions (MB) | "
                      "held, most (MB) | peak file-backed (MB) | peak RSS (MB) | seconds | "
                      "scoring images/s | stage with the peak |" + (" cgroup peak (MB) |" if limited else ""),
                      "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if limited else ""),
                      *rows])
    print(text)
    if not args.no_write:
        write_section(f"memory-{args.source}-{args.runner}" + ("-limited" if limited else ""), text)


if __name__ == "__main__":
    main()
