"""The clean run, library only: start -> score -> decide -> remediate -> write -> commit.

Everything is built in a hidden staging folder beside OUT and moved into place at the end, so a
crash leaves no partial output. Each step is a plain function; flows/ wraps them as tasks, and
`run_clean` runs them in this process. Every input ends in exactly one action (kept, augmented,
dropped or rejected), which decide/remediate.py alone sets.
"""
from __future__ import annotations

import logging
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipeline.decide.dedup import THRESHOLD_MEANING, DedupSettings, build_index, check_faiss, \
    duplicate_columns, mark_earlier_duplicates, on_gpu, search_views
from pipeline.decide.embeddings import Embedder
from pipeline.decide.flagging import Threshold, band_low, flag
from pipeline.decide.remediate import augment_and_rescore, plan, record_json, reject_changed, settle
from pipeline.io.data import ImageSpec, Source, discover, read_selected
from pipeline.io.manifest import manifest
from pipeline.io.outputs import (INDEX, check_against, decided_table, earlier_survivors, embed_png, replace_column,
                                 write_cleaned, write_embeddings, write_flagged, write_tables)
from pipeline.io.report import write_report, write_report_assets
from pipeline.io.store import AtomicParquetWriter, OutputLock, check_output_dir, commit_dir, ok_mask, \
    score_values, staging_dir, write_json_atomic
from pipeline.run.resources import held_mb, resources, trim_heap
from pipeline.run.settings import RunSettings
from pipeline.run.shards import ScoreJob, Scored, score_source
from pipeline.score.models import LoadedModel
from pipeline.score.scoring import image_spec

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the steps of one run share; the fields below `embedder` are filled by this module's
    steps as the run goes."""

    settings: RunSettings
    source: Source
    model: LoadedModel
    embedder: Embedder
    staging: Path
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # process peak RSS after each stage
    held_mb: dict[str, float] = field(default_factory=dict)  # anonymous memory held after each stage
    scoring: dict[str, dict[str, Any]] = field(default_factory=dict)  # per source: fresh, reused, s, images/s
    index: Any = None  # the FAISS index over this run's embeddings, once built
    image_bytes: dict[str, int] = field(default_factory=dict)  # image bytes written: cleaned, flagged
    lock: OutputLock | None = None  # held on the output path from start to commit or abort

    @property
    def job(self) -> ScoreJob:
        return ScoreJob(self.settings, str(self.staging))

    @property
    def spec(self) -> ImageSpec:
        return image_spec(self.model, self.settings.input.max_pixels, self.settings.input.min_size)

    @property
    def dup_threshold(self) -> float:
        t = self.settings.dedup.dup_threshold
        return self.embedder.default_threshold if t is None else t

    @property
    def out(self) -> Path:
        return Path(self.settings.output.out)


class Stage:
    """Time a stage into ctx.timings: `with Stage(ctx, "score"): ...`."""

    def __init__(self, ctx: RunContext, name: str):
        self.ctx, self.name = ctx, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        log.info("stage %s ...", self.name)

    def __exit__(self, *exc: Any) -> None:
        self.ctx.timings[self.name] = round(time.perf_counter() - self.t0, 3)
        trim_heap()  # what the stage freed leaves the process, not only its heap
        held = held_mb()
        if held is not None:
            self.ctx.held_mb[self.name] = held
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        self.ctx.peak_rss_mb[self.name] = round(peak, 1)
        log.info("stage %s: %.1f s, peak RSS so far %.0f MB, held after it %s MB", self.name,
                 self.ctx.timings[self.name], peak, held)


def sources(ctx: RunContext) -> list[tuple[str, Source, bool]]:
    """What a run scores: (prefix, source, embed?) for the input and the reference."""
    s = ctx.settings
    out = [("input", ctx.source, True)]
    if s.flag.reference:
        out.append(("reference", discover(s.flag.reference, s.input.image_column), False))
    return out


def stage_name(prefix: str) -> str:
    """The timings key of scoring a source: score (the input) or score_reference."""
    return "score" if prefix == "input" else f"score_{prefix}"


def scoring_summary(ctx: RunContext, prefix: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Record a source's scoring: images solved afresh and reused from the cache, seconds, and
    images/s over the fresh ones (what the solver cost)."""
    fresh, reused = sum(r["fresh"] for r in results), sum(r["reused"] for r in results)
    seconds = ctx.timings.get(stage_name(prefix), 0.0)
    ctx.scoring[prefix] = {"fresh": fresh, "reused": reused, "seconds": seconds,
                           "images_per_s": round(fresh / seconds, 3) if fresh and seconds > 0 else None}
    log.info("%s: %d images scored afresh (%s images/s), %d reused", prefix, fresh,
             ctx.scoring[prefix]["images_per_s"], reused)
    return ctx.scoring[prefix]


def start_run(settings: RunSettings) -> RunContext:
    """Take the output's lock, check what the settings alone cannot (paths, the model,
    --against), load the model and open a staging folder: nothing is scored yet."""
    out = Path(settings.output.out)
    lock = OutputLock(out)
    try:
        check_output_dir(out, settings.output.overwrite)
        source = discover(settings.input.data, settings.input.image_column)
        if settings.flag.reference:
            discover(settings.flag.reference, settings.input.image_column)
        model = resources().model(settings.model)
        embedder = resources().embedder(settings.dedup.embedder, model, settings.dedup.embed_size, settings.model.device)
        check_faiss()  # before any scoring: the index is searched memory-mapped
        if settings.dedup.against:
            check_against(settings.dedup.against, embedder.name)
        return RunContext(settings, source, model, embedder, staging_dir(out), lock=lock)
    except BaseException:
        lock.release()
        raise


def threshold_of(ctx: RunContext, values: np.ndarray, ok: np.ndarray, reference: pa.Table | None) -> Threshold:
    """The flagging threshold, with the accept band of replacements in its details."""
    s = ctx.settings
    ref = score_values(reference, s.flag.score)[ok_mask(reference)] if reference is not None else None
    threshold = s.flag.threshold_for(values[ok], ref)
    low = band_low(ref if ref is not None else values[ok], s.remediation.accept_band)
    return replace(threshold, details={**threshold.details, "accept_band": [low, threshold.value],
                                       "accept_band_quantile": s.remediation.accept_band,
                                       "accept_band_of": "reference" if ref is not None else "dataset"})


def search_duplicates(vectors: np.ndarray, flipped: np.ndarray | None, table: pa.Table, ok: np.ndarray,
                      risk: np.ndarray, threshold: float, embedder: Embedder, dedup: DedupSettings,
                      device: str, index_path: Path) -> tuple[dict[str, list], Any]:
    """dup_cluster, dup_of and dup_similarity of every row (this table's clusters, then an
    earlier output's with --against), and the index over the ok rows' vectors, written to
    index_path (the output's index.faiss) and memory-mapped from it."""
    views = search_views(vectors, embedder.search_view)  # computed once: for the index and as queries
    index = build_index(views, device=device, path=index_path)
    cols = duplicate_columns(vectors, flipped, table.column("id"), table.column("pixel_sha256"), risk, ok,
                             threshold, embedder, index, views)
    if dedup.against:
        earlier_ids, earlier = earlier_survivors(dedup.against, embedder.name)
        mark_earlier_duplicates(cols, ok, vectors, dedup.against, earlier_ids, earlier, threshold, embedder, device,
                                views)
    return cols, index


def dedup_record(embedder: Embedder, threshold: float, dedup: DedupSettings, index) -> dict[str, Any]:
    """The manifest's `dedup` section, less the cluster counts (manifest.dedup_section adds them)."""
    return {"embedder": embedder.name, "threshold": threshold, "flip": dedup.dedup_flip,
            "index": type(index).__name__ if index is not None else None,
            "index_on_gpu": bool(index is not None and on_gpu(index)),
            "threshold_meaning": THRESHOLD_MEANING, "against": dedup.against}


def duplicates(ctx: RunContext, scored: Scored, ok: np.ndarray, risk: np.ndarray) -> dict[str, list]:
    """dup_cluster, dup_of and dup_similarity: this run's clusters, then an earlier output's."""
    n, s = scored.table.num_rows, ctx.settings
    if not s.remediation.dedups or not ok.any():
        return {"dup_cluster": [None] * n, "dup_of": [None] * n, "dup_similarity": [None] * n}
    cols, ctx.index = search_duplicates(scored.vectors, scored.flipped, scored.table, ok, risk, ctx.dup_threshold,
                                        ctx.embedder, s.dedup, s.model.device, ctx.staging / INDEX)
    return cols


def decide(ctx: RunContext, scored: Scored, reference: pa.Table | None) -> tuple[dict[str, list], Threshold, np.ndarray]:
    """Threshold, flags, duplicates and first actions: the decision columns, and which rows
    to augment."""
    table, s = scored.table, ctx.settings
    ok = ok_mask(table)
    values = score_values(table, s.flag.score)
    threshold = threshold_of(ctx, values, ok, reference)
    flagged = flag(values, threshold) & ok
    cols = duplicates(ctx, scored, ok, values)
    action, reason, augment = plan(ok, flagged, cols["dup_of"], s.remediation)
    n = table.num_rows
    cols.update({
        "flagged": [bool(f) if o else None for f, o in zip(flagged, ok)],
        "flag_reason": [threshold.reason(v, s.flag.score) if f else None for v, f in zip(values, flagged)],
        "action": action, "action_reason": reason,
        "augment_preset": [None] * n, "augment_tries": [None] * n,
        "augmented_score": [None] * n, "augmentation": [None] * n, "augmented_png": [None] * n,
    })
    return cols, threshold, augment


def remediate(ctx: RunContext, table: pa.Table, cols: dict[str, list], augment: np.ndarray,
              threshold: Threshold, progress: Callable[[int], None] | None = None) -> None:
    """Augment and re-score the rows marked for augmentation, and settle their actions."""
    rows = {table.column("id")[int(r)].as_py(): int(r) for r in np.where(augment)[0]}
    if not rows:
        return
    s = ctx.settings
    folder = ctx.staging / "augmented"
    folder.mkdir(exist_ok=True)
    images = read_selected(ctx.source, set(rows), ctx.spec)
    low = threshold.details["accept_band"][0]
    results = augment_and_rescore(images, ctx.model, ctx.spec, s.scorer, threshold, low, s.flag.score,
                                  s.remediation, folder, s.model.batch_size, s.model.device, progress)
    for id_, row in rows.items():
        a = results.get(id_)
        if a is not None:
            cols["augment_preset"][row], cols["augment_tries"][row] = a.preset, a.tries
            cols["augmented_score"][row], cols["augmentation"][row] = a.score, record_json(a)
            cols["augmented_png"][row] = str(a.png) if a.accepted else None
    settle(cols["action"], cols["action_reason"], rows, results, threshold, low, s.remediation.on_failure)


def write_outputs(ctx: RunContext, scored: Scored, decided: pa.Table, threshold: Threshold,
                  reference: pa.Table | None) -> pa.Table:
    """cleaned/, then the tables (with inputs that changed meanwhile turned rejected), the
    reference scores, the embeddings and the index."""
    s = ctx.settings
    with Stage(ctx, "write_cleaned"):
        changed, ctx.image_bytes["cleaned"] = write_cleaned(ctx.staging / "cleaned", ctx.source, decided,
                                                             s.flag.score, s.output)
        decided = reject_changed_rows(decided, changed)
    with Stage(ctx, "write_tables"):
        meta = {"settings": s.flat(), "threshold": threshold.to_dict(), "model_fingerprint": ctx.model.fingerprint}
        write_tables(ctx.staging, decided, meta)
        ctx.image_bytes["flagged"] = write_flagged(ctx.staging, ctx.source, decided, s.flag.score, meta,
                                                   s.output.row_group_rows)
        if reference is not None:
            with AtomicParquetWriter(ctx.staging / "reference_scores.parquet", reference.schema, meta) as w:
                w.write_table(reference)
        if scored.vectors is not None:
            write_embeddings(ctx.staging, decided, scored.table, scored.vectors,
                             embed_png(ctx.embedder, ctx.spec, s.model.device), ctx.embedder.name)
            if ctx.index is None:  # no duplicate search ran: the index is still an output
                build_index(scored.vectors, view=ctx.embedder.search_view, path=ctx.staging / INDEX)
    return decided


def reject_changed_rows(decided: pa.Table, changed: set[str]) -> pa.Table:
    """Inputs whose bytes changed between their scoring and write_cleaned become rejected
    (changed_during_run): what was judged is not what would be written."""
    if not changed:  # the usual case: no column to rebuild
        return decided
    action = decided.column("action").to_pylist()
    hit = reject_changed(decided.column("id").to_pylist(), action, changed)
    if any(hit):
        decided = replace_column(decided, "action", action)
        for name, value in (("status", "rejected"), ("reject_reason", "changed_during_run")):
            decided = replace_column(decided, name, [value if h else v for v, h in
                                                     zip(decided.column(name).to_pylist(), hit)])
    return decided


def run_manifest(ctx: RunContext, decided: pa.Table, threshold: Threshold, reference: pa.Table | None) -> dict[str, Any]:
    s = ctx.settings
    dedup = dedup_record(ctx.embedder, ctx.dup_threshold, s.dedup, ctx.index)
    return manifest(decided, threshold=threshold.to_dict(), score=s.flag.score, dedup=dedup, reference=reference,
                    reference_path=s.flag.reference, model=ctx.model.record(),
                    data={"path": ctx.source.path, "kind": ctx.source.kind}, settings=s.flat(),
                    timings=ctx.timings, peak_rss_mb=ctx.peak_rss_mb, held_mb=ctx.held_mb, scoring=ctx.scoring,
                    cache_dir=s.cache.root, out=str(ctx.out), image_bytes=ctx.image_bytes)


def finish_run(ctx: RunContext, scored: Scored, reference: Scored | None,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Flag, dedup, remediate, write every output and move the run into place."""
    ref_table = None if reference is None else reference.table
    with Stage(ctx, "flag_and_dedup"):
        cols, threshold, augment = decide(ctx, scored, ref_table)
    with Stage(ctx, "remediate"):
        remediate(ctx, scored.table, cols, augment, threshold, progress)
    decided = write_outputs(ctx, scored, decided_table(scored.table, cols), threshold, ref_table)
    result = run_manifest(ctx, decided, threshold, ref_table)
    write_json_atomic(ctx.staging / "manifest.json", result)
    with Stage(ctx, "report"):
        write_report_assets(ctx.staging, ctx.source, ctx.spec, decided, ctx.settings.flag.score)
        write_report(ctx.staging)
    for scratch in ("shards", "augmented"):
        shutil.rmtree(ctx.staging / scratch, ignore_errors=True)
    commit_dir(ctx.staging, ctx.out, ctx.settings.output.overwrite)
    if ctx.lock is not None:
        ctx.lock.release()
    return result


def abort_run(ctx: RunContext) -> None:
    """Remove the staging folder and release the output: nothing of the run remains."""
    shutil.rmtree(ctx.staging, ignore_errors=True)
    if ctx.lock is not None:
        ctx.lock.release()


def run_clean(settings: RunSettings, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The whole clean run into settings.output.out, in this process; returns the manifest."""
    ctx = start_run(settings)
    try:
        scored = {}
        for prefix, source, embed in sources(ctx):
            with Stage(ctx, stage_name(prefix)):
                scored[prefix], results = score_source(ctx.job, source, prefix, embed, progress)
            scoring_summary(ctx, prefix, results)
        return finish_run(ctx, scored["input"], scored.get("reference"))
    except BaseException:
        abort_run(ctx)
        raise
