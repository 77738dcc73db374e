"""Whether two `memclean clean` outputs made the same decisions: every row's scores, flags,
clusters and actions, the counts and threshold, and the cleaned dataset's bytes.

    .venv/bin/python benchmarks/compare_outputs.py OUT_A OUT_B

Run times, package versions, the output paths and cache reuse may differ; nothing else. Exits 0
when the outputs agree, else prints each difference and exits 1. Used to check that a change
meant to keep behaviour (a refactor) keeps the demo's outputs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

IGNORED_COLUMNS = {"reused", "augmented_png", "path", "path_bytes"}  # paths differ between clones
MANIFEST_KEYS = ("counts", "reject_reasons", "threshold", "reference")
DEDUP_KEYS = ("embedder", "threshold", "clusters", "in_clusters", "flip")


def rows(path: Path) -> dict[str, dict]:
    table = pq.read_table(path)
    keep = [c for c in table.column_names if c not in IGNORED_COLUMNS]
    return {r["id"]: r for r in table.select(keep).to_pylist()}


def differences(a: Path, b: Path) -> list[str]:
    out = []
    for name in ("scores.parquet", "flagged.parquet", "reference_scores.parquet"):
        if (a / name).exists() != (b / name).exists():
            out.append(f"{name}: in one output only")
            continue
        if not (a / name).exists():
            continue
        ra, rb = rows(a / name), rows(b / name)
        if set(ra) != set(rb):
            out.append(f"{name}: ids differ: {sorted(set(ra) ^ set(rb))[:10]}")
        for i in sorted(set(ra) & set(rb)):
            diff = {k: (ra[i].get(k), rb[i].get(k)) for k in set(ra[i]) | set(rb[i]) if ra[i].get(k) != rb[i].get(k)}
            if diff:
                out.append(f"{name} {i}: {diff}")
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for key in MANIFEST_KEYS:
        if {k: v for k, v in (ma.get(key) or {}).items() if k != "path"} != \
                {k: v for k, v in (mb.get(key) or {}).items() if k != "path"}:
            out.append(f"manifest {key}: {ma.get(key)} != {mb.get(key)}")
    for key in DEDUP_KEYS:
        if ma["dedup"].get(key) != mb["dedup"].get(key):
            out.append(f"manifest dedup.{key}: {ma['dedup'].get(key)} != {mb['dedup'].get(key)}")
    ca, cb = (pq.read_table(p / "cleaned").sort_by("id") for p in (a, b))
    if not ca.equals(cb):
        out.append(f"cleaned/: {ca.num_rows} rows != {cb.num_rows} rows, or their bytes differ")
    return out


def main() -> None:
    a, b = (Path(p) for p in sys.argv[1:3])
    found = differences(a, b)
    for line in found[:200]:
        print(line)
    print(f"{len(found)} differences between {a} and {b}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
