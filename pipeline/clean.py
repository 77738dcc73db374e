"""The clean run, library only: score -> flag -> decide -> write cleaned data, tables, manifest.

Everything is built in a hidden staging folder beside OUT and moved into place at the end, so a
crash leaves no partial output. Each step is a plain function; flows/ wraps them as tasks.
Every input ends in exactly one action: kept, augmented, dropped or rejected.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__
from .data import ImageSpec, Rejected, Source, discover
from .flagging import Threshold, flag, quantile_threshold
from .models import LoadedModel, load_model
from .scoring import image_spec, score_items
from .store import (DECISION_SCHEMA, SCORE_SCHEMA, AtomicParquetWriter, check_output_dir,
                    cleaned_schema, commit_dir, staging_dir, write_json_atomic)
from .volume import ScorerSettings

log = logging.getLogger(__name__)

SCORE_CHOICES = ("log_volume_growth", "logp")
ACTIONS = ("kept", "augmented", "dropped", "rejected")


@dataclass(frozen=True)
class CleanSettings:
    """The decisions and I/O of a clean run (the scorer has its own settings)."""

    flag_quantile: float = 0.95  # flag scores above this quantile of the dataset's own
    score: str = "log_volume_growth"  # the score column that is judged
    batch_size: int = 16  # images decoded and solved together
    device: str = "cpu"  # where the model runs
    image_column: str | None = None  # Parquet sources: the column holding images
    max_pixels: int = ImageSpec.max_pixels  # larger images are rejected (decompression bombs)
    min_size: int = ImageSpec.min_size  # images with a shorter side are rejected
    shard_rows: int = 10_000  # rows per cleaned/ Parquet file
    row_group_rows: int = 256  # rows per row group in cleaned/

    def __post_init__(self) -> None:
        if self.score not in SCORE_CHOICES:
            raise ValueError(f"--score {self.score!r} is not one of {SCORE_CHOICES}")
        if not 0 < self.flag_quantile < 1:
            raise ValueError(f"--flag-quantile must lie in (0, 1), got {self.flag_quantile}")
        if self.batch_size < 1 or self.shard_rows < 1 or self.row_group_rows < 1:
            raise ValueError("batch_size, shard_rows and row_group_rows must be at least 1")


@dataclass
class RunContext:
    """What the steps of one run share."""

    source: Source
    model: LoadedModel
    scorer: ScorerSettings
    settings: CleanSettings
    staging: Path
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class Stage:
    """Time a stage into ctx.timings: `with Stage(ctx, "score"): ...`."""

    def __init__(self, ctx: RunContext, name: str):
        self.ctx, self.name = ctx, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        log.info("stage %s ...", self.name)

    def __exit__(self, *exc: Any) -> None:
        self.ctx.timings[self.name] = round(time.perf_counter() - self.t0, 3)


def score_source(ctx: RunContext, progress: Callable[[int], None] | None = None) -> pa.Table:
    """Score every input into staging/raw_scores.parquet; returns it as a table."""
    spec = image_spec(ctx.model, ctx.settings.max_pixels, ctx.settings.min_size)
    metadata = {"settings": ctx.scorer.to_dict(), "model_fingerprint": ctx.model.fingerprint}
    path = ctx.staging / "raw_scores.parquet"
    with AtomicParquetWriter(path, SCORE_SCHEMA, metadata) as writer:
        for rows in score_items(ctx.model, ctx.source, ctx.scorer, spec, ctx.settings.batch_size,
                                ctx.settings.device, progress):
            writer.write(rows)
    return pq.read_table(path)


def decide(scores: pa.Table, settings: CleanSettings) -> tuple[pa.Table, Threshold]:
    """Flag by threshold and choose each row's action: flagged -> dropped, others kept."""
    ok = np.array([s == "ok" for s in scores.column("status").to_pylist()], dtype=bool)
    values = scores.column(settings.score).to_numpy(zero_copy_only=False).astype(np.float64)
    threshold = quantile_threshold(values[ok], settings.flag_quantile)
    flagged = flag(values, threshold) & ok
    action = np.where(~ok, "rejected", np.where(flagged, "dropped", "kept"))
    reasons = [threshold.reason(v, settings.score) if f else None for v, f in zip(values, flagged)]
    decided = scores
    for name, column in (("flagged", pa.array(np.where(ok, flagged, None).tolist(), pa.bool_())),
                         ("flag_reason", pa.array(reasons, pa.string())),
                         ("action", pa.array(action.tolist(), pa.string()))):
        decided = decided.append_column(DECISION_SCHEMA.field(name), column)
    return decided, threshold


def write_cleaned(ctx: RunContext, decided: pa.Table) -> dict[str, int]:
    """Stream the source again and write kept images to staging/cleaned/ in the datasets Image
    layout, sharded. An image whose bytes changed since scoring is reported, not written."""
    wanted = {i: (a, sha, v) for i, a, sha, v in zip(*(decided.column(c).to_pylist() for c in
              ("id", "action", "sha256", ctx.settings.score))) if a in ("kept", "augmented")}
    out = ctx.staging / "cleaned"
    out.mkdir()
    n_files = max(1, -(-len(wanted) // ctx.settings.shard_rows))
    shard, writer, written, changed = 0, None, 0, []
    for item in ctx.source:
        if item.id not in wanted:
            continue
        action, sha, value = wanted[item.id]
        try:
            data = item.read()
        except (Rejected, OSError):
            data = b""
        if hashlib.sha256(data).hexdigest() != sha:
            changed.append(item.id)
            continue
        if writer is None or writer.count >= ctx.settings.shard_rows:
            if writer is not None:
                writer.commit()
            writer = AtomicParquetWriter(out / f"train-{shard:05d}-of-{n_files:05d}.parquet",
                                         cleaned_schema(), {}, ctx.settings.row_group_rows)
            shard += 1
        name = os.path.basename(item.path) or item.id
        writer.write([{"image": {"bytes": data, "path": name}, "id": item.id, "sha256": sha,
                       "action": action, "log_volume_growth": value}])
        written += 1
    if writer is not None:
        writer.commit()
    return {"written": written, "changed": changed}


def mark_changed(decided: pa.Table, changed: list[str]) -> pa.Table:
    """Inputs whose bytes changed between scoring and writing become rejected rows."""
    if not changed:
        return decided
    changed_set = set(changed)
    ids = decided.column("id").to_pylist()
    hit = [i in changed_set for i in ids]
    def patch(name: str, value: Any) -> pa.Array:
        col = decided.column(name).to_pylist()
        return pa.array([value if h else c for c, h in zip(col, hit)], decided.schema.field(name).type)
    for name, value in (("status", "rejected"), ("reject_reason", "changed_during_run"), ("action", "rejected")):
        decided = decided.set_column(decided.schema.get_field_index(name), name, patch(name, value))
    return decided


def counts(decided: pa.Table) -> dict[str, int]:
    """The manifest counts; input = kept + augmented + dropped + rejected always."""
    actions = Counter(decided.column("action").to_pylist())
    statuses = Counter(decided.column("status").to_pylist())
    flagged = sum(bool(f) for f in decided.column("flagged").to_pylist())
    c = {"input": decided.num_rows, "rejected": actions["rejected"], "scored": statuses["ok"],
         "flagged": flagged, **{a: actions[a] for a in ("kept", "augmented", "dropped")}}
    assert c["input"] == c["kept"] + c["augmented"] + c["dropped"] + c["rejected"], c
    return c


def write_tables(ctx: RunContext, decided: pa.Table, metadata: dict[str, Any]) -> None:
    """scores.parquet (every input) and flagged.parquet (the flagged rows)."""
    for name, table in (("scores.parquet", decided),
                        ("flagged.parquet", decided.filter(pc.equal(decided.column("flagged"), True)))):
        with AtomicParquetWriter(ctx.staging / name, decided.schema, metadata) as w:
            w.write_table(table)
    (ctx.staging / "raw_scores.parquet").unlink()


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import torchdiffeq

    return {"memclean": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "torchdiffeq": torchdiffeq.__version__,
            "pyarrow": pa.__version__, "numpy": np.__version__}


def manifest(ctx: RunContext, decided: pa.Table, threshold: Threshold, out: Path) -> dict[str, Any]:
    reasons = Counter(r for r in decided.column("reject_reason").to_pylist() if r)
    return {
        "counts": counts(decided),
        "reject_reasons": dict(sorted(reasons.items())),
        "threshold": threshold.to_dict(),
        "model": {"path": str(ctx.model.paths.root), "fingerprint": ctx.model.fingerprint,
                  "scheduler": ctx.model.scheduler_class, "channels": ctx.model.channels,
                  "sample_size": list(ctx.model.sample_size)},
        "data": {"path": ctx.source.path, "kind": ctx.source.kind},
        "settings": {"scorer": ctx.scorer.to_dict(), "clean": asdict(ctx.settings)},
        "versions": versions(),
        "timings_s": ctx.timings,
        "out": str(out),
    }


def run_clean(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike,
              scorer: ScorerSettings = ScorerSettings(), settings: CleanSettings = CleanSettings(),
              allow_pickle: bool = False, overwrite: bool = False,
              progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The whole clean run into `out`; returns the manifest."""
    out = Path(out)
    check_output_dir(out, overwrite)
    source = discover(data, settings.image_column)
    loaded = load_model(model, allow_pickle, settings.device)
    staging = staging_dir(out)
    try:
        ctx = RunContext(source, loaded, scorer, settings, staging)
        with Stage(ctx, "score"):
            raw = score_source(ctx, progress)
        with Stage(ctx, "flag"):
            decided, threshold = decide(raw, settings)
        with Stage(ctx, "write_cleaned"):
            written = write_cleaned(ctx, decided)
        decided = mark_changed(decided, written["changed"])
        with Stage(ctx, "write_tables"):
            meta = {"settings": scorer.to_dict(), "threshold": threshold.to_dict(),
                    "model_fingerprint": loaded.fingerprint}
            write_tables(ctx, decided, meta)
        result = manifest(ctx, decided, threshold, out)
        write_json_atomic(staging / "manifest.json", result)
        commit_dir(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result
