"""The clean run, library only, in three public steps that `memclean clean` and the flow `clean`
both call:

    with start_run(settings) as ctx:               # lock OUT, check, load the model, stage
        scored = score_sources(ctx, score_shards)  # every source, shard by shard (in this process,
                                                   # or mapped over Prefect tasks by the flow)
        manifest = finish_run(ctx, scored)         # flag, dedup, remediate, write, commit

Everything is built in a staging folder (run/staged.py) and moved into place at the end, so a
crash leaves no partial output. Every input ends in exactly one action (kept, augmented,
dropped or rejected), which decide/remediate.py alone sets.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.decide.chance import ChanceThreshold, given_threshold, threshold_by_chance
from pipeline.decide.clusters import THRESHOLD_MEANING, DedupSettings, duplicate_columns, mark_earlier_duplicates
from pipeline.decide.copies import read_copied
from pipeline.decide.embeddings import Embedder
from pipeline.decide.flagging import Threshold, band_low, flag
from pipeline.decide.index import build_index, check_faiss, on_gpu, search_views
from pipeline.decide.remediate import GuardSettings, RemediationSettings, augment_and_rescore, losses, plan, \
    record_json, reject_changed, settle
from pipeline.decide.scores import Judged, judge_scores
from pipeline.io.data import ImageSpec, Shard, Source, discover, open_image, read_verified
from pipeline.io.manifest import manifest, tally
from pipeline.io.outputs import (EMBEDDINGS, INDEX, ImageSpool, check_against, decided_table, earlier_survivors, embed_png,
                                 write_cleaned, write_embeddings, write_flagged, write_tables)
from pipeline.io.report import write_report, write_report_assets
from pipeline.io.store import JUDGED_SCHEMA, AtomicParquetWriter, OutputSettings, ok_mask, write_json_atomic
from pipeline.run.passes import precision_record, spend
from pipeline.run.resources import resources
from pipeline.run.settings import RunSettings
from pipeline.score.ready import ready, resolved_scorer
from pipeline.run.shards import ScoreJob, Scored, gather, score_shards
from pipeline.run.staged import StagedRun
from pipeline.score.models import LoadedModel
from pipeline.score.scoring import image_spec

log = logging.getLogger(__name__)

# Scores a source's shards: (job, prefix, shards, embed?) -> one result per shard, in order (its
# name, rows, fresh, reused). In this process (`in_process`) or mapped by the flow.
ShardScorer = Callable[[ScoreJob, str, Iterable[Shard], bool], list[dict[str, Any]]]


@dataclass
class RunContext:
    """What the steps of one run share. A context manager: leaving it with an error, or without
    finish_run's commit, removes the staging folder and releases OUT."""

    settings: RunSettings
    source: Source
    model: LoadedModel
    embedder: Embedder
    run: StagedRun  # the output: lock, staging folder, stage timings and memory
    scoring: dict[str, dict[str, Any]] = field(default_factory=dict)  # per source: fresh, reused, s, images/s
    image_bytes: dict[str, int] = field(default_factory=dict)  # image bytes written: cleaned, flagged
    changed: set[str] = field(default_factory=set)  # inputs whose bytes changed since scoring (read_verified)
    precision: list[float] = field(default_factory=list)  # the judged score's noise ratio after each pass
    dup_threshold: ChanceThreshold | None = None  # the duplicate threshold decide used, and how it was set
    against: list[str] = field(default_factory=list)  # the earlier outputs --against names, resolved once
    copied: dict[str, int] = field(default_factory=dict)  # --flag-copied: {id: generations copying it}, read once

    @property
    def staging(self) -> Path:
        assert self.run.staging is not None
        return self.run.staging

    @property
    def job(self) -> ScoreJob:
        return ScoreJob(self.settings, str(self.staging))

    @property
    def spec(self) -> ImageSpec:
        return image_spec(self.model, self.settings.input.max_pixels, self.settings.input.min_size)

    def __enter__(self) -> "RunContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.run.abort()  # a no-op after the commit


def start_run(settings: RunSettings) -> RunContext:
    """Take the output's lock, check what the settings alone cannot (paths, the model,
    --against), load the model and open a staging folder: nothing is scored yet."""
    run = StagedRun(settings.output.out, settings.output.overwrite).open()
    try:
        model = resources().model(settings.model)  # first: a wrong --model fails before any input is counted
        source = discover(settings.input.data, settings.input.image_column)
        with run.stage("compile"):  # the batch size resolved, the network compiled (score/ready.py)
            scorer = resolved_scorer(settings.scorer, settings.model)
            settings = replace(settings, model=ready(model, settings.model, scorer, settings.cache.shard_size),
                               scorer=scorer)
        source.skipped  # a folder's files that are not images: said now, recorded in the manifest
        if settings.flag.reference:
            discover(settings.flag.reference, settings.input.image_column)
        embedder = resources().embedder(settings.dedup.embedder, model, settings.dedup.embed_size, settings.model.device)
        check_faiss()  # before any scoring: the index is searched memory-mapped
        against = check_against(settings.dedup.against, embedder.name) if settings.dedup.against else []
        copied = read_copied(settings.flag.copied) if settings.flag.copied else {}
        return RunContext(settings, source, model, embedder, run, against=against, copied=copied)
    except BaseException:
        run.abort()
        raise


def sources(ctx: RunContext) -> list[tuple[str, Source, bool]]:
    """What a run scores: (prefix, source, embed?) for the input and the reference."""
    s = ctx.settings
    out = [("input", ctx.source, True)]
    if s.flag.reference:  # embedded when the duplicate threshold is measured against it (chance.py)
        out.append(("reference", discover(s.flag.reference, s.input.image_column),
                    s.dedup.auto and s.remediation.dedups))
    return out


def stage_name(prefix: str) -> str:
    """The timings key of scoring a source: score (the input), score_reference, score_input_pass2, ..."""
    return "score" if prefix == "input" else f"score_{prefix}"


def in_process(progress: Callable[[int], None] | None = None) -> ShardScorer:
    """A ShardScorer that scores the shards in this process (two at once on CUDA: run/shards.py)."""
    def score(job: ScoreJob, prefix: str, shards: Iterable[Shard], embed: bool) -> list[dict[str, Any]]:
        return score_shards(job, prefix, shards, embed, progress)
    return score


def score_sources(ctx: RunContext, score_shards: ShardScorer) -> dict[str, Scored]:
    """Score every source (the input, then the reference) shard by shard with `score_shards`,
    record each source's scoring, and gather its shards: prefix -> Scored. Then pass after pass
    with the next seed, averaged in (run/passes.py), while the judged score's noise ratio is
    above --precision-target (at most --max-passes)."""
    s = ctx.settings
    scored = score_pass(ctx, score_shards, 0)
    tables = spend(s.judge, {k: v.table for k, v in scored.items()},
                   lambda k: {p: v.table for p, v in score_pass(ctx, score_shards, k).items()}, ctx.precision)
    scored = {k: replace(v, table=tables[k]) for k, v in scored.items()}
    log.info("%d scoring passes; noise ratio of %s after each: %s", len(ctx.precision), s.judge.score, ctx.precision)
    return scored


def score_pass(ctx: RunContext, score_shards: ShardScorer, k: int) -> dict[str, Scored]:
    """Pass k over every source: the scorer's seed + k; embeddings only in pass 0 (they do not
    depend on the seed)."""
    settings = ctx.settings
    if k:
        settings = replace(settings, scorer=replace(settings.scorer, seed=settings.scorer.seed + k))
    job = ScoreJob(settings, str(ctx.staging))
    scored = {}
    for prefix, source, embed in sources(ctx):
        name = prefix if k == 0 else f"{prefix}_pass{k + 1}"
        with ctx.run.stage(stage_name(name)):
            results = score_shards(job, name, source.shards(settings.cache.shard_size), embed and k == 0)
        scoring_summary(ctx, name, results)
        scored[prefix] = gather(job, [r["name"] for r in results])
    return scored


def scoring_summary(ctx: RunContext, prefix: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Record a source's scoring: images solved afresh and reused from the cache, seconds, and
    images/s over the fresh ones (what the solver cost)."""
    fresh, reused = sum(r["fresh"] for r in results), sum(r["reused"] for r in results)
    seconds = ctx.run.timings.get(stage_name(prefix), 0.0)
    ctx.scoring[prefix] = {"fresh": fresh, "reused": reused, "seconds": seconds,
                           "images_per_s": round(fresh / seconds, 3) if fresh and seconds > 0 else None}
    log.info("%s: %d images scored afresh (%s images/s), %d reused", prefix, fresh,
             ctx.scoring[prefix]["images_per_s"], reused)
    return ctx.scoring[prefix]


def threshold_of(ctx: RunContext, values: np.ndarray, ok: np.ndarray, reference: np.ndarray | None) -> Threshold:
    """The flagging threshold from the judged scores (the dataset's, and the reference's ok
    rows'), with the accept band of replacements in its details."""
    s = ctx.settings
    threshold = s.flag.threshold_for(values[ok], reference)
    low = band_low(reference if reference is not None else values[ok], s.remediation.accept_band)
    return replace(threshold, details={**threshold.details, "accept_band": [low, threshold.value],
                                       "accept_band_quantile": s.remediation.accept_band,
                                       "accept_band_of": "reference" if reference is not None else "dataset"})


def judge_threshold(vectors: np.ndarray, table: pa.Table, ok: np.ndarray, index, views: np.ndarray,
                    embedder: Embedder, dedup: DedupSettings, reference: Scored | None = None) -> ChanceThreshold:
    """The duplicate threshold: --dup-threshold as given, or with auto the chance level measured
    on the reference's embedded rows (else on the dataset's own: `vectors`, the ok rows of
    `table`, searched in `index` over their `views`) and the threshold above it (decide/chance.py)."""
    if not dedup.auto:
        return given_threshold(dedup.dup_threshold)
    mask = pa.array(ok)
    ref_vectors = ref_ids = None
    if reference is not None and reference.vectors is not None:
        ref_vectors = reference.vectors
        ref_ids = reference.table.column("id").filter(pa.array(ok_mask(reference.table))).to_pylist()
    t = threshold_by_chance(vectors, table.column("pixel_sha256").filter(mask), index, views, embedder,
                            dedup.dup_false_join_rate, ref_vectors, ref_ids, table.column("id").filter(mask))
    log.info("duplicate threshold %.4f (auto: %s, fitted %s on %d draws)", t.value, t.source, t.fitted, t.sample)
    return t


def search_duplicates(vectors: np.ndarray, flipped: np.ndarray | None, table: pa.Table, ok: np.ndarray,
                      risk: np.ndarray, embedder: Embedder, dedup: DedupSettings, device: str, index_path: Path,
                      reference: Scored | None = None,
                      against: Sequence[str] = ()) -> tuple[dict[str, list], Any, ChanceThreshold]:
    """dup_cluster, dup_of and dup_similarity of every row (this table's clusters, then the
    earlier outputs' in `against`, check_against's list), the index over the ok rows' vectors,
    written to index_path (the output's index.faiss) and memory-mapped from it, and the threshold used:
    --dup-threshold, or with auto the chance level measured on the reference's embedded rows
    (else on the dataset's own) and the threshold above it (decide/chance.py)."""
    n = table.num_rows
    given = None if dedup.auto else given_threshold(dedup.dup_threshold)
    if vectors is None or not ok.any():
        none = {"dup_cluster": [None] * n, "dup_of": [None] * n, "dup_similarity": [None] * n}
        return none, None, given or ChanceThreshold(embedder.default_threshold, "auto", note="no duplicate search ran")
    views = search_views(vectors, embedder.search_view)  # computed once: for the index and as queries
    index = build_index(views, device=device, path=index_path)
    given = judge_threshold(vectors, table, ok, index, views, embedder, dedup, reference)
    threshold = given.value
    cols = duplicate_columns(vectors, flipped, table.column("id"), table.column("pixel_sha256"), risk, ok,
                             threshold, embedder, index, views)
    if against:
        earlier_ids, earlier = earlier_survivors(against)
        mark_earlier_duplicates(cols, ok, vectors, earlier_ids, earlier, threshold, embedder, device, views)
    return cols, index, given


def dedup_record(embedder: Embedder, threshold: ChanceThreshold, dedup: DedupSettings, index,
                 against: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest's `dedup` section, less the cluster counts (manifest.dedup_section adds them):
    `against` as given, `against_outputs` the earlier outputs it resolved to (check_against)."""
    return {"embedder": embedder.name, "threshold": threshold.value, "threshold_chosen": threshold.to_dict(),
            "flip": dedup.dedup_flip, "index": type(index).__name__ if index is not None else None,
            "index_on_gpu": bool(index is not None and on_gpu(index)),
            "threshold_meaning": THRESHOLD_MEANING, "against": dedup.against, "against_outputs": list(against)}


def decision_columns(table: pa.Table, dup: dict[str, list], flagged: np.ndarray, flag_reason: list[str | None],
                     remediation: RemediationSettings, judged_cols: dict[str, list] | None = None,
                     uncertain: list[bool | None] | None = None) -> tuple[dict[str, list], np.ndarray]:
    """Every decision column (DECISION_SCHEMA) from the duplicates, flags and judged scores
    (nulls without them: memclean dedup), with the first actions (remediate.plan); returns
    them and which rows to augment."""
    n, ok = table.num_rows, ok_mask(table)
    action, reason, augment = plan(ok, flagged, dup["dup_of"], remediation)
    cols = {**{f.name: [None] * n for f in JUDGED_SCHEMA}, **(judged_cols or {}), **dup,
            "flagged": [bool(f) if o else None for f, o in zip(flagged, ok)],
            "flag_uncertain": uncertain or [None] * n, "flag_reason": flag_reason,
            "action": action, "action_reason": reason,
            **{k: [None] * n for k in ("augment_preset", "augment_tries", "augmented_score", "augmented_volume_growth",
                                       "augmentation", "augmented_png")}}
    return cols, augment


def decide(ctx: RunContext, scored: Scored, reference: Scored | None) -> tuple[dict[str, list], Threshold, np.ndarray,
                                                                                Any, Judged]:
    """Judged scores, threshold, flags, duplicates and first actions: the decision columns, the
    threshold, which rows to augment, the FAISS index of the duplicate search (None when none
    ran) and the judged scores."""
    table, s = scored.table, ctx.settings
    ok = ok_mask(table)
    if not ok.any():
        reasons = tally(table.column("reject_reason"))
        raise ValueError(f"none of the {table.num_rows} inputs of {ctx.source.path!r} could be scored, so nothing can be "
                         f"judged: rejected as {dict(sorted(reasons.items()))}")
    j = judge_scores(table, ok, reference.table if reference is not None else None, s.judge.score)
    threshold = threshold_of(ctx, j.values, ok, j.reference_values)
    threshold = replace(threshold, details={**threshold.details, "calibration": j.calibration.to_dict()})
    flagged = flag(j.values, threshold) & ok
    near = np.abs(j.values - threshold.value) <= 2 * j.se
    uncertain = [bool(u) if o and np.isfinite(e) else None for u, o, e in zip(near, ok, j.se)]
    vectors = scored.vectors if s.remediation.dedups else None
    dup, index, ctx.dup_threshold = search_duplicates(vectors, scored.flipped, table, ok, j.values, ctx.embedder,
                                                      s.dedup, s.model.device, ctx.staging / INDEX, reference,
                                                      ctx.against)
    reasons = [threshold.reason(v, s.judge.score) if f else None for v, f in zip(j.values, flagged)]
    if s.flag.copied:
        threshold = flag_copied(ctx, table, ok, flagged, reasons, threshold)
    cols, augment = decision_columns(table, dup, flagged, reasons, s.remediation, j.columns, uncertain)
    return cols, threshold, augment, index, j


def flag_copied(ctx: RunContext, table: pa.Table, ok: np.ndarray, flagged: np.ndarray, reasons: list[str | None],
                threshold: Threshold) -> Threshold:
    """--flag-copied: the training images a verify run found copied are flagged (in place:
    `flagged`, `reasons`) whatever their score; the threshold's details say how many."""
    ids = table.column("id")
    hits = pc.is_in(ids, value_set=pa.array(list(ctx.copied), pa.string())).to_numpy(zero_copy_only=False) & ok
    only = hits & ~flagged
    for r in np.flatnonzero(only):
        n = ctx.copied[ids[int(r)].as_py()]
        reasons[r] = f"copied by {n} generation(s) (memclean verify {ctx.settings.flag.copied})"
    flagged |= only
    record = {"from": ctx.settings.flag.copied, "copied_images": len(ctx.copied), "in_this_run": int(hits.sum()),
              "flagged_by_copy_only": int(only.sum())}
    return replace(threshold, details={**threshold.details, "flag_copied": record})


def remediate(ctx: RunContext, table: pa.Table, cols: dict[str, list], augment: np.ndarray,
              threshold: Threshold, j: Judged) -> None:
    """Augment and re-score the rows marked for augmentation, and settle their actions; an
    input that changed since scoring goes to ctx.changed (reject_changed rejects it)."""
    rows = {table.column("id")[int(r)].as_py(): int(r) for r in np.where(augment)[0]}
    if not rows:
        return
    s = ctx.settings
    folder = ctx.staging / "augmented"
    folder.mkdir(exist_ok=True)
    sha = {i: table.column("sha256")[r].as_py() for i, r in rows.items()}
    images = {item.id: (open_image(data, ctx.spec), sha[item.id])
              for item, data in read_verified(ctx.source, sha, ctx.changed)}
    low = threshold.details["accept_band"][0]
    results = augment_and_rescore(images, ctx.model, ctx.spec, s.scorer, threshold, low,
                                  partial(j.judge, name=s.judge.score), s.remediation, folder, s.model.batch_size,
                                  s.model.device)
    for id_, row in rows.items():
        a = results.get(id_)
        if a is not None:
            cols["augment_preset"][row], cols["augment_tries"][row] = a.preset, a.tries
            cols["augmented_score"][row], cols["augmentation"][row] = a.score, record_json(a)
            cols["augmented_volume_growth"][row] = a.volume
            cols["augmented_png"][row] = str(a.png) if a.accepted else None
    keepers = {i for i, r in rows.items() if cols["dup_cluster"][r] is not None and cols["dup_of"][r] is None}
    settle(cols["action"], cols["action_reason"], rows, results, threshold, low, s.remediation, keepers)


def write_dataset(run: StagedRun, source: Source, decided: pa.Table, changed: set[str], score: str,
                  remediation: RemediationSettings, output: OutputSettings,
                  spool: bool) -> tuple[pa.Table, ImageSpool | None, int]:
    """cleaned/ (and, with `spool`, the flagged rows' images) in one pass over the source, every
    input whose bytes changed since scoring rejected and the decisions made consistent again
    (remediate.reject_changed), as clean and dedup both write it. Returns the decided table,
    the spool and the bytes written to cleaned/."""
    reconcile = partial(reject_changed, score=score, settings=remediation)
    images = ImageSpool(run.staging / ".flagged-images.arrow") if spool else None
    with run.stage("write_cleaned"):
        decided = reconcile(decided, changed)  # inputs found changed while remediating
        decided, written = write_cleaned(run.staging / "cleaned", source, decided, score, output, reconcile, images)
    return decided, images, written


def write_outputs(ctx: RunContext, scored: Scored, decided: pa.Table, threshold: Threshold,
                  reference: pa.Table | None, index) -> pa.Table:
    """cleaned/ (with inputs that changed meanwhile rejected), then the tables, the flagged
    images, the reference scores, the embeddings and the index."""
    s = ctx.settings
    decided, spool, ctx.image_bytes["cleaned"] = write_dataset(ctx.run, ctx.source, decided, ctx.changed,
                                                               s.judge.score, s.remediation, s.output, spool=True)
    with ctx.run.stage("write_tables"):
        meta = {"settings": s.flat(), "threshold": threshold.to_dict(), "model_fingerprint": ctx.model.fingerprint}
        write_tables(ctx.staging, decided, meta)
        ctx.image_bytes["flagged"] = write_flagged(ctx.staging, spool, decided, s.judge.score, meta,
                                                   s.output.row_group_rows)
        if reference is not None:
            with AtomicParquetWriter(ctx.staging / "reference_scores.parquet", reference.schema, meta) as w:
                w.write_table(reference)
        if scored.vectors is not None:
            write_embeddings(ctx.staging, decided, scored.table, scored.vectors,
                             embed_png(ctx.embedder, ctx.spec, s.model.device), ctx.embedder.name)
            if index is None:  # no duplicate search ran: the index is still an output
                build_index(scored.vectors, view=ctx.embedder.search_view, path=ctx.staging / INDEX)
    return decided


def run_manifest(ctx: RunContext, decided: pa.Table, threshold: Threshold, reference: pa.Table | None,
                 index) -> dict[str, Any]:
    s = ctx.settings
    dedup = dedup_record(ctx.embedder, ctx.dup_threshold, s.dedup, index, ctx.against)
    precision = precision_record(s.judge, ctx.precision)
    return manifest(decided, kind="clean", run=ctx.run.record(), threshold=threshold.to_dict(), score=s.judge.score,
                    dedup=dedup, reference=reference, reference_path=s.flag.reference, model=ctx.model.record(),
                    data=ctx.source.record(), settings=s.flat(),
                    scoring=ctx.scoring, cache_dir=s.cache.root, out=str(ctx.run.out), image_bytes=ctx.image_bytes,
                    precision=precision)


class PlanRefused(ValueError):
    """A run whose decisions would empty its dataset past --max-loss-fraction: nothing was
    committed; its plan is where the message says."""


def commit_with_report(run: StagedRun, source: Source, spec: ImageSpec, decided: pa.Table, score: str,
                       result: Callable[[], dict[str, Any]], guard: GuardSettings,
                       against: Sequence[str] = ()) -> dict[str, Any]:
    """manifest.json (from `result`, with the pictures the decisions remove, once before the
    report, which reads it, and once after, with the report's timing), the report, scratch
    removed, and the commit; or, past the guard, the plan set aside in OUT.plan and PlanRefused."""
    lost = losses(decided, against)
    refused = guard.refusal(lost)
    plan_path = run.out.with_name(run.out.name + ".plan")  # where a refused run's plan goes
    write_json_atomic(run.staging / "manifest.json", {**result(), "losses": lost, "refused": refused})
    with run.stage("report"):
        write_report_assets(run.staging, source, spec, decided, score)
        write_report(run.staging)
    final = {**result(), "losses": lost, "refused": refused}
    write_json_atomic(run.staging / "manifest.json", final)
    for scratch in ("shards", "augmented"):
        shutil.rmtree(run.staging / scratch, ignore_errors=True)
    if refused is not None:  # not an output: the dataset and its index go, the plan stays to be read
        shutil.rmtree(run.staging / "cleaned", ignore_errors=True)
        for name in (INDEX, EMBEDDINGS):
            (run.staging / name).unlink(missing_ok=True)
        plan = run.set_aside(plan_path)
        raise PlanRefused(f"{refused}. Nothing was written to {str(run.out)!r}; the plan (scores.parquet, "
                          f"flagged.parquet, report.html, manifest.json) is in {str(plan)!r}. Raise "
                          "--max-loss-fraction to accept it, or see the report for what joined or failed")
    run.commit()
    shutil.rmtree(plan_path, ignore_errors=True)  # an earlier refused run's plan is stale now
    return final


def finish_run(ctx: RunContext, scored: dict[str, Scored]) -> dict[str, Any]:
    """Flag, dedup, remediate, write every output and move the run into place; returns the
    manifest."""
    with ctx.run.stage("flag_and_dedup"):
        cols, threshold, augment, index, j = decide(ctx, scored["input"], scored.get("reference"))
        ref_table = j.reference
    with ctx.run.stage("remediate"):
        remediate(ctx, scored["input"].table, cols, augment, threshold, j)
    decided = write_outputs(ctx, scored["input"], decided_table(scored["input"].table, cols), threshold, ref_table,
                            index)
    return commit_with_report(ctx.run, ctx.source, ctx.spec, decided, ctx.settings.judge.score,
                              lambda: run_manifest(ctx, decided, threshold, ref_table, index), ctx.settings.guard,
                              ctx.against)


def run_clean(settings: RunSettings, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The whole clean run into settings.output.out, in this process; returns the manifest."""
    with start_run(settings) as ctx:
        return finish_run(ctx, score_sources(ctx, in_process(progress)))
