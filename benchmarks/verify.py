"""memclean verify, measured: the copies it finds against the number of generations and DDIM
steps, a clean run's flags held against them, and the copy search at scale; writes RESULTS.md's
`verify` section.

    .venv/bin/python benchmarks/verify.py [--sets demo photos] [--steps 10 25 50 100] [--generations 1000]
                                          [--scale 12500 50000 --train 200000]

For each set (demo: examples/digits with examples/model; photos: examples/photos with
examples/photo-model; digits2: benchmarks/acceptance.py's second digits set, made once under
~/.cache/memclean-bench): a clean run with `memclean demo`'s settings (prefect.yaml's clean/demo,
the held-out split as the reference), then `memclean verify --from` it once per --steps; the
first 250 and 500 generations are the first of the 1000 (the noise is drawn by block), so their
counts come from the same run. The scale check searches synthetic vectors of the pixel
embedder's size (1,024: its grey thumbnail) with planted copies, as decide/copies.py searches
pixels: seconds and the process's peak memory, and whether every planted copy and no other
generation is found.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results import hardware, publish  # noqa: E402
from memclean.cli import demo_parameters  # noqa: E402
from pipeline.run.lifecycle import run_clean  # noqa: E402
from pipeline.run.settings import RunSettings, VerifySettings  # noqa: E402
from pipeline.run.verify import run_verify  # noqa: E402

SETS = {"demo": ("examples/digits", "examples/model"), "photos": ("examples/photos", "examples/photo-model")}
PREFIXES = (250, 500)  # counts of the first generations, from the same run


def paths(name: str) -> tuple[Path, Path]:
    if name == "digits2":
        from benchmarks.acceptance import set_paths

        cache = Path.home() / ".cache" / "memclean-bench"
        return set_paths("digits2", cache, cache / "wheels")
    data, model = SETS[name]
    return REPO / data, REPO / model


def prefix_counts(out: Path, n: int) -> tuple[int, int]:
    """Copying generations among the first n, and the pictures they copy."""
    gens = pq.read_table(out / "generations.parquet", columns=["generation", "copy", "nearest_id"]).to_pylist()
    picture = {r["id"]: r["picture"] for r in pq.read_table(out / "copied.parquet", columns=["id", "picture"]).to_pylist()}
    hits = [g for g in gens if g["generation"] < n and g["copy"]]
    return len(hits), len({picture[g["nearest_id"]] for g in hits})


def measure_set(name: str, steps: list[int], generations: int, work: Path) -> tuple[list[str], list[str]]:
    data, model = paths(name)
    params = {**demo_parameters(REPO), "data": str(data / "train"), "reference": str(data / "heldout"),
              "model": str(model), "out": str(work / f"{name}-clean")}
    t0 = time.perf_counter()
    run_clean(RunSettings.from_flat(params))
    clean_s = time.perf_counter() - t0
    rows, flags = [], []
    for k in steps:
        out = work / f"{name}-verify-{k}"
        t0 = time.perf_counter()
        m = run_verify(VerifySettings.from_flat({
            "model": str(model), "data": str(data / "train"), "out": str(out), "generations": generations,
            "sample_steps": k, "clean_output": params["out"], "reference": params["reference"],
            "cache_dir": str(work / "cache")}))
        seconds = time.perf_counter() - t0
        c = m["copies"]
        for n in PREFIXES:
            if n < generations:
                count, pictures = prefix_counts(out, n)
                rows.append(f"| {name} | {k} | {n} | {count} | {count / n:.3f} | {pictures} | | |")
        lo, hi = c["interval95"]
        rows.append(f"| {name} | {k} | {generations} | {c['generations']} | {c['rate']:.3f} ({lo:.3f}-{hi:.3f}) | "
                    f"{c['copied_pictures']} | {m['similar']['generations']} | {seconds:.0f} |")
        f = m["flags"]
        auc = f["auc"]
        recall = "-" if f["recall"] is None else f"{f['recall']:.3f}"
        flags.append(f"| {name} | {k} | {c['copied_images']} | {recall} | {f['flag_rate_not_copied']:.3f} | "
                     f"{'-' if f['removed_copied'] is None else format(f['removed_copied'], '.3f')} | "
                     f"{f['judged']} {auc.get(f['judged'], float('nan')):.3f} | {auc.get('log_volume_growth', float('nan')):.3f} | "
                     f"{auc.get('denoising_score', float('nan')):.3f} |")
    print(f"{name}: clean run {clean_s:.0f} s", flush=True)
    return rows, flags


def scale(queries: list[int], train: int, work: Path, d: int = 1024, planted: int = 500) -> list[str]:
    """nearest_distinct over synthetic vectors: seconds, peak RSS, planted copies found."""
    from pipeline.decide.copies import nearest_distinct, ratio_test

    rng = np.random.default_rng(0)
    x = np.memmap(work / "train.f32", np.float32, "w+", shape=(train, d))
    for s in range(0, train, 20000):  # written a chunk at a time: memory stays a chunk
        x[s:s + 20000] = rng.standard_normal((min(20000, train - s), d), dtype=np.float32)
    x.flush()
    x = np.memmap(work / "train.f32", np.float32, "r", shape=(train, d))
    groups = np.arange(train)
    rows = []
    for q in queries:
        g = rng.standard_normal((q, d), dtype=np.float32)
        src = rng.choice(train, planted, replace=False)
        g[:planted] = x[src] + 0.05 * rng.standard_normal((planted, d), dtype=np.float32)  # near copies
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        d1, d2, near = nearest_distinct(g, x, groups)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        copy = ratio_test(d1, d2, 1 / 3)
        found = int((copy[:planted] & (near[:planted] == src)).sum())
        rows.append(f"| {q:,} | {train:,} | {d} | {seconds:.0f} | {q * train / seconds / 1e6:.0f} | {peak:.0f} "
                    f"({before:.0f} before) | {found}/{planted} | {int(copy[planted:].sum())} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="*", default=["demo", "photos"], choices=("demo", "photos", "digits2"))
    ap.add_argument("--steps", nargs="+", type=int, default=[10, 25, 50, 100])
    ap.add_argument("--photo-steps", nargs="+", type=int, default=[25, 50], help="--steps for photos (slower)")
    ap.add_argument("--generations", type=int, default=1000)
    ap.add_argument("--scale", nargs="*", type=int, default=[12500, 50000], help="generations of the scale check")
    ap.add_argument("--train", type=int, default=200000, help="training vectors of the scale check")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="memclean-verify-bench-"))
    counts, flags = [], []
    for name in args.sets:
        r, f = measure_set(name, args.photo_steps if name == "photos" else args.steps, args.generations, work)
        counts += r
        flags += f
    scaled = scale(args.scale, args.train, work) if args.scale else []
    text = [f"Regenerate: `.venv/bin/python benchmarks/verify.py` ({time.time() - t0:.0f} s; {hardware()}). "
            "DDIM generations (seed 0) from each set's model; a copy: nearest training image closer than 1/3 of the "
            "nearest other picture (L2, pixels); pictures: exact copies and the clean run's duplicate clusters. "
            "The first 250 and 500 generations are the first of the same run.", "",
            "| set | DDIM steps | generations | copies | rate (95% interval) | pictures copied | similar | s |",
            "|---|---|---|---|---|---|---|---|", *counts, "",
            "The clean run's flags (`memclean demo`'s settings) against the training images the generations copy: "
            "recall (copied images flagged), the flag rate among the others, the share of copied images dropped or "
            "augmented, and each score's AUC, copied vs not copied:", "",
            "| set | DDIM steps | copied images | recall | flag rate, not copied | removed | AUC, judged | AUC, V | "
            "AUC, the loss |", "|---|---|---|---|---|---|---|---|---|", *flags]
    if scaled:
        text += ["", "The copy search at scale (`decide/copies.nearest_distinct`: exact FAISS L2 over the training "
                 "vectors in chunks of 256 MB, memory-mapped; synthetic Gaussian vectors of the pixel embedder's "
                 "1,024 grey values, every training row its own picture, 500 planted near copies among the "
                 "generations; peak RSS is the process's, with what it held before):", "",
                 "| generations | training images | dims | s | million pairs/s | peak RSS MB | planted found | other "
                 "copies |", "|---|---|---|---|---|---|---|---|", *scaled]
    publish("verify", "What models copy: `benchmarks/verify.py`", "\n".join(text), write=not args.no_write)
    print(json.dumps({"work": str(work)}))


if __name__ == "__main__":
    main()
