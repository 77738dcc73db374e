"""manifest.json: what a clean run did, in numbers (counts, threshold, duplicates, model,
settings, versions, timings), so that every output can be traced and reproduced.
"""
from __future__ import annotations

import platform
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import __version__
from pipeline.io.store import ok_mask


def versions() -> dict[str, str]:
    """The versions of everything that makes the numbers."""
    import albumentations
    import diffusers
    import faiss
    import torchdiffeq

    return {"memclean": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "torchdiffeq": torchdiffeq.__version__,
            "pyarrow": pa.__version__, "numpy": np.__version__, "faiss": faiss.__version__,
            "albumentations": albumentations.__version__}


def tally(column: pa.ChunkedArray) -> Counter:
    """How often each non-null value occurs, counted by Arrow (no Python object per row)."""
    return Counter({v["values"]: v["counts"] for v in pc.value_counts(column.drop_null()).to_pylist()})


ACTIONS = ("kept", "augmented", "dropped", "rejected")  # the one action every input ends in


def counts(decided: pa.Table) -> dict[str, int]:
    """The manifest counts; input = kept + augmented + dropped + rejected always, or ValueError
    (a row without one of the four actions is a bug the run must not commit)."""
    actions, statuses = tally(decided.column("action")), tally(decided.column("status"))
    flagged = tally(decided.column("flagged"))[True]
    c = {"input": decided.num_rows, "rejected": actions["rejected"], "scored": statuses["ok"],
         "flagged": flagged, **{a: actions[a] for a in ("kept", "augmented", "dropped")}}
    if c["input"] != sum(c[a] for a in ACTIONS):
        other = {a: n for a, n in actions.items() if a not in ACTIONS}
        raise ValueError(f"{c['input'] - sum(c[a] for a in ACTIONS)} inputs have no action of {ACTIONS} "
                         f"(other actions: {other}, null: {decided.column('action').null_count}): {c}")
    return c


def threshold_section(threshold: dict[str, Any], score: str, c: dict[str, int]) -> dict[str, Any]:
    """The threshold (policy, value, interval, accept band) with the flag rate it gave."""
    return {**threshold, "score": score, "realised_flag_rate": c["flagged"] / c["scored"] if c["scored"] else None}


def dedup_section(decided: pa.Table, dedup: dict[str, Any]) -> dict[str, Any]:
    """The duplicate search's settings and index (`dedup`) with the clusters it found."""
    clusters = tally(decided.column("dup_cluster"))
    return {**dedup, "clusters": len(clusters), "in_clusters": sum(clusters.values())}


def reference_section(reference: pa.Table | None, path: str | None) -> dict[str, Any] | None:
    if reference is None:
        return None
    return {"path": path, "input": reference.num_rows, "scored": int(ok_mask(reference).sum())}


def scoring_section(by_source: dict[str, dict[str, Any]], cache_dir: str | None,
                    precision: dict[str, Any] | None = None) -> dict[str, Any]:
    """Images solved afresh and reused over every source and pass; with `precision`, the passes
    run and the judged score's noise ratio after each (run/passes.py)."""
    out = {"scored_fresh": sum(v["fresh"] for v in by_source.values()),
           "reused": sum(v["reused"] for v in by_source.values()), "by_source": by_source, "cache_dir": cache_dir}
    return {**out, "precision": precision} if precision is not None else out


def manifest(decided: pa.Table, *, kind: str, run: dict[str, dict[str, float]], threshold: dict[str, Any] | None,
             score: str, dedup: dict[str, Any], reference: pa.Table | None, reference_path: str | None,
             model: dict[str, Any] | None, data: dict[str, Any], settings: dict[str, Any],
             scoring: dict[str, dict[str, Any]], cache_dir: str | None, out: str,
             image_bytes: dict[str, int] | None = None, precision: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a finished run (every argument is already plain data). kind: clean, or
    dedup (no scores: its counts say what was decoded, and it has no threshold). run: the
    staged run's record (timings_s, peak_rss_mb, held_mb), the same keys for every verb."""
    reasons = {r: n for r, n in tally(decided.column("reject_reason")).items() if r}
    c = counts(decided)
    if kind == "dedup":
        c = {"input": c["input"], "decoded": c["scored"], "kept": c["kept"], "dropped": c["dropped"],
             "rejected": c["rejected"]}
    return {
        "kind": kind,
        "counts": c,
        "reject_reasons": dict(sorted(reasons.items())),
        "threshold": threshold_section(threshold, score, c) if threshold is not None else None,
        "dedup": dedup_section(decided, dedup),
        "reference": reference_section(reference, reference_path),
        "model": model,
        "data": data,
        "settings": settings,
        "versions": versions(),
        **run,  # timings_s, peak_rss_mb, held_mb: seconds, peak RSS and anonymous memory after each stage
        "scoring": scoring_section(scoring, cache_dir, precision),
        "image_bytes": image_bytes or {},  # bytes of images written into cleaned/ and flagged.parquet
        "out": out,
    }
