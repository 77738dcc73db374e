"""The clean run, library only: score -> flag -> dedup -> remediate -> write outputs.

Everything is built in a hidden staging folder beside OUT and moved into place at the end, so a
crash leaves no partial output. Each step is a plain function; flows/ wraps them as tasks.
Every input ends in exactly one action: kept, augmented, dropped or rejected.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from . import __version__
from .cache import ScoreCache, namespace, open_cache
from .data import ImageSpec, Item, Rejected, Source, batched, decode_image, discover, open_image
from .dedup import Clusters, build_index, find_clusters, near_matches, on_gpu, to_cpu
from .embeddings import Embedder, make_embedder
from .flagging import FlagSettings, Threshold, band_low, flag
from .models import LoadedModel, load_model
from .remediate import RemediationSettings, augment_and_rescore, plan, record_json
from .report import ids_to_show, write_report, write_thumbnails
from .scoring import image_spec, score_batch
from .store import (DECISION_SCHEMA, SCORE_SCHEMA, AtomicParquetWriter, check_output_dir,
                    cleaned_schema, commit_dir, staging_dir, write_json_atomic)
from .volume import SCORER_VERSION, ScorerSettings, bits_offset

log = logging.getLogger(__name__)

SCORE_CHOICES = ("log_volume_growth", "logp")
EMBEDDINGS = "embeddings.parquet"  # id, action, embedding: what --against reads


@dataclass(frozen=True)
class CleanSettings:
    """The decisions and I/O of a clean run (the scorer has its own settings)."""

    flag: FlagSettings = FlagSettings()  # which threshold policy flags
    remediation: RemediationSettings = RemediationSettings()  # what happens to flagged/duplicates
    score: str = "log_volume_growth"  # the score column that is judged
    reference: str | None = None  # held-out images for --flag-fpr calibration
    embedder: str = "pixel"  # pixel | unet | torchscript:PATH
    embed_size: int = 224  # torchscript embedders: input side
    dup_threshold: float | None = None  # duplicate similarity; None = the embedder's default
    dedup_flip: bool = False  # also match horizontally mirrored copies
    against: str | None = None  # an earlier output folder to check new images against
    batch_size: int = 16  # images decoded and solved together
    device: str = "cpu"  # where the model runs
    variant: str | None = None  # diffusers weight variant to load (fp16, ...)
    data_range: str = "auto"  # the model's data range: auto (VP [-1, 1], VE [0, 1]) | signed | unit
    image_column: str | None = None  # Parquet sources: the column holding images
    max_pixels: int = ImageSpec.max_pixels  # larger images are rejected (decompression bombs)
    min_size: int = ImageSpec.min_size  # images with a shorter side are rejected
    shard_size: int = 256  # images per scoring shard (the unit of caching, resuming and mapping)
    shard_rows: int = 10_000  # rows per cleaned/ Parquet file
    row_group_rows: int = 256  # rows per row group in cleaned/

    def __post_init__(self) -> None:
        if self.score not in SCORE_CHOICES:
            raise ValueError(f"--score {self.score!r} is not one of {SCORE_CHOICES}")
        if min(self.batch_size, self.shard_size, self.shard_rows, self.row_group_rows) < 1:
            raise ValueError("batch_size, shard_size, shard_rows and row_group_rows must be at least 1")
        if self.dup_threshold is not None and not -1 <= self.dup_threshold <= 1:
            raise ValueError(f"--dup-threshold is a cosine similarity in [-1, 1], got {self.dup_threshold}")
        self.flag.policy(self.reference is not None)  # validates the policy choice
        if self.against is not None and not self.remediation.dedups:
            raise ValueError(f"--against compares new images with an earlier output's duplicates, which only "
                             f"--action auto or dedup does; this run has --action {self.remediation.action}")


@dataclass
class RunContext:
    """What the steps of one run share."""

    source: Source
    model: LoadedModel
    scorer: ScorerSettings
    settings: CleanSettings
    staging: Path
    embedder: Embedder
    job: ScoreJob | None = None  # what scoring workers need
    out: Path = Path()  # the final output folder
    overwrite: bool = False  # replace an existing output
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # process peak RSS after each stage
    index: Any = None  # the FAISS index over this run's embeddings, once built
    scoring: dict[str, dict[str, int]] = field(default_factory=dict)  # fresh / reused per source

    @property
    def spec(self) -> ImageSpec:
        return image_spec(self.model, self.settings.max_pixels, self.settings.min_size)

    @property
    def dup_threshold(self) -> float:
        t = self.settings.dup_threshold
        return self.embedder.default_threshold if t is None else t


class Stage:
    """Time a stage into ctx.timings: `with Stage(ctx, "score"): ...`."""

    def __init__(self, ctx: RunContext, name: str):
        self.ctx, self.name = ctx, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        log.info("stage %s ...", self.name)

    def __exit__(self, *exc: Any) -> None:
        self.ctx.timings[self.name] = round(time.perf_counter() - self.t0, 3)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        self.ctx.peak_rss_mb[self.name] = round(peak, 1)
        log.info("stage %s: %.1f s, peak RSS so far %.0f MB", self.name, self.ctx.timings[self.name], peak)


@dataclass
class Scored:
    """Pass one over a source: score rows, and embeddings of the decodable rows in order."""

    table: pa.Table
    vectors: np.ndarray | None  # [n_ok, d]
    flipped: np.ndarray | None  # [n_ok, d] of mirrored images, with --dedup-flip


@dataclass(frozen=True)
class ScoreJob:
    """Everything a worker (a thread, a process, a Dask worker) needs to score shards."""

    model: str  # checkpoint path
    allow_pickle: bool
    scorer: ScorerSettings
    settings: CleanSettings
    staging: str  # the run's staging folder (shard files go to staging/shards/)
    cache_dir: str | None  # score cache root; None disables caching


def _checkpoint_stamp(path: str) -> tuple:
    """(file, size, mtime) of every file under the checkpoint: changes when it is rewritten."""
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=4)
def _load_once(path: str, allow_pickle: bool, device: str, variant: str | None, data_range: str,
               stamp: tuple) -> LoadedModel:
    return load_model(path, allow_pickle, device, variant, data_range)


def shared_model(path: str, allow_pickle: bool, settings: CleanSettings) -> LoadedModel:
    """load_model once per process (the run and its scoring threads share it); a checkpoint
    rewritten in place since is loaded afresh."""
    return _load_once(str(path), allow_pickle, settings.device, settings.variant, settings.data_range,
                      _checkpoint_stamp(str(path)))


def job_context(job: ScoreJob) -> tuple[LoadedModel, Embedder, ImageSpec, ScoreCache | None]:
    """The model, embedder, input spec and cache of a job (loaded once per process)."""
    model = shared_model(job.model, job.allow_pickle, job.settings)
    embedder = make_embedder(job.settings.embedder, model, job.settings.embed_size, job.settings.device)
    spec = image_spec(model, job.settings.max_pixels, job.settings.min_size)
    cache = None
    if job.cache_dir is not None:
        key = namespace(model.fingerprint, {**job.scorer.to_dict(), "scorer_version": SCORER_VERSION}, asdict(spec))
        cache = open_cache(job.cache_dir, key)
    return model, embedder, spec, cache


def shard_items(source: Source, size: int) -> Iterator[list[Item]]:
    """The source in consecutive shards of `size` items."""
    shard: list[Item] = []
    for item in source:
        shard.append(item)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def score_shard(job: ScoreJob, items: list[Item], name: str, embed: bool,
                progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score (or reuse cached scores of) one shard into staging/shards/name.parquet, with the
    embeddings of its decodable images in name.npy. Returns the paths and counts."""
    model, embedder, spec, cache = job_context(job)
    folder = Path(job.staging) / "shards"
    folder.mkdir(exist_ok=True)
    rows, vectors, flipped = [], [], []
    for batch in batched(items, spec, job.settings.batch_size):
        rows += score_batch(model, batch, job.scorer, job.settings.device, progress, cache)
        pixels = [d.pixels for d in batch if d.pixels is not None]
        if embed and pixels:
            x = torch.stack(pixels).to(job.settings.device)
            vectors.append(embedder(x).cpu().numpy())
            if job.settings.dedup_flip:
                flipped.append(embedder(x, flip=True).cpu().numpy())
    with AtomicParquetWriter(folder / f"{name}.parquet", SCORE_SCHEMA, {}) as w:
        w.write(rows)
    for suffix, parts in (("npy", vectors), ("flip.npy", flipped)):
        if parts:
            np.save(folder / f"{name}.{suffix}", np.concatenate(parts))
    reused = sum(bool(r["reused"]) for r in rows)
    return {"name": name, "rows": len(rows), "reused": reused,
            "fresh": sum(r["status"] == "ok" for r in rows) - reused}


def gather(job: ScoreJob, names: list[str]) -> Scored:
    """Concatenate shard files in order."""
    folder = Path(job.staging) / "shards"
    table = pa.concat_tables([pq.read_table(folder / f"{n}.parquet") for n in names]) if names else SCORE_SCHEMA.empty_table()

    def stack(suffix: str) -> np.ndarray | None:
        parts = [np.load(folder / f"{n}.{suffix}") for n in names if (folder / f"{n}.{suffix}").exists()]
        return np.concatenate(parts) if parts else None
    return Scored(table, stack("npy"), stack("flip.npy"))


def score_source(job: ScoreJob, source: Source, prefix: str, embed: bool, shard_size: int,
                 progress: Callable[[int], None] | None = None) -> tuple[Scored, list[dict[str, Any]]]:
    """Score a whole source shard by shard in this process (the flow maps shards instead)."""
    results = [score_shard(job, items, shard_name(prefix, k), embed, progress)
               for k, items in enumerate(shard_items(source, shard_size))]
    return gather(job, [r["name"] for r in results]), results


def shard_name(prefix: str, k: int) -> str:
    return f"{prefix}-{k:06d}"


def stage_name(prefix: str) -> str:
    """The timings key of scoring a source: score (the input) or score_reference."""
    return "score" if prefix == "input" else f"score_{prefix}"


def scoring_summary(ctx: RunContext, prefix: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Record a source's scoring in ctx.scoring: images solved afresh and reused from the cache,
    seconds, and images/s over the fresh ones (what the solver cost)."""
    fresh, reused = sum(r["fresh"] for r in results), sum(r["reused"] for r in results)
    seconds = ctx.timings.get(stage_name(prefix), 0.0)
    ctx.scoring[prefix] = {"fresh": fresh, "reused": reused, "seconds": seconds,
                           "images_per_s": round(fresh / seconds, 3) if fresh and seconds > 0 else None}
    log.info("%s: %d images scored afresh (%s images/s), %d reused", prefix, fresh,
             ctx.scoring[prefix]["images_per_s"], reused)
    return ctx.scoring[prefix]


def ok_mask(table: pa.Table) -> np.ndarray:
    return np.array([s == "ok" for s in table.column("status").to_pylist()], dtype=bool)


def score_values(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def check_against(against: str, embedder: Embedder) -> dict[str, Any]:
    """The manifest of an earlier output (--against), checked before any work: it must be a
    memclean output with embeddings from the same embedder."""
    prev = Path(against)
    try:
        manifest = json.loads((prev / "manifest.json").read_text())
        pq.read_schema(prev / EMBEDDINGS)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"--against {str(prev)!r} is not a memclean output with embeddings: {e}") from e
    if manifest.get("dedup", {}).get("embedder") != embedder.name:
        raise ValueError(f"--against {str(prev)!r} was embedded with {manifest.get('dedup', {}).get('embedder')!r}, "
                         f"this run with {embedder.name!r}: they cannot be compared")
    return manifest


def previous_survivors(ctx: RunContext) -> tuple[list[str], np.ndarray]:
    """Ids and embeddings of the kept and augmented images of an earlier output (--against)."""
    check_against(ctx.settings.against, ctx.embedder)
    table = pq.read_table(Path(ctx.settings.against) / EMBEDDINGS)
    keep = np.isin(np.array(table.column("action").to_pylist(), dtype=object), ["kept", "augmented"])
    ids = [i for i, k in zip(table.column("id").to_pylist(), keep) if k]
    vecs = np.array(table.column("embedding").to_pylist(), dtype=np.float32)[keep] if keep.any() else np.zeros((0, 1), np.float32)
    return ids, vecs


def dedup(ctx: RunContext, scored: Scored, ok: np.ndarray, risk: np.ndarray) -> dict[str, list]:
    """Duplicate columns for every row: dup_cluster, dup_of, dup_similarity."""
    n = scored.table.num_rows
    cols = {"dup_cluster": [None] * n, "dup_of": [None] * n, "dup_similarity": [None] * n}
    rows = np.where(ok)[0]
    if not ctx.settings.remediation.dedups or not len(rows):
        return cols
    ids = scored.table.column("id").to_pylist()
    hashes = scored.table.column("pixel_sha256").to_pylist()
    ctx.index = build_index(ctx.embedder.search_view(scored.vectors), device=ctx.settings.device)
    c = find_clusters(scored.vectors, [hashes[r] for r in rows], risk[rows], [ids[r] for r in rows],
                      ctx.dup_threshold, ctx.embedder, scored.flipped, ctx.index)
    for k, r in enumerate(rows):
        if c.cluster[k] >= 0:
            cols["dup_cluster"][r] = int(c.cluster[k])
            cols["dup_similarity"][r] = float(c.best_similarity[k])
            keeper = rows[c.keeper[k]]
            cols["dup_of"][r] = ids[keeper] if keeper != r else None
    if ctx.settings.against:
        prev_ids, prev_vecs = previous_survivors(ctx)
        match, sim = near_matches(scored.vectors, prev_vecs, ctx.dup_threshold, ctx.embedder,
                                  ctx.settings.device)
        for k, r in enumerate(rows):
            if match[k] >= 0 and cols["dup_of"][r] is None:
                cols["dup_of"][r] = f"{ctx.settings.against}:{prev_ids[match[k]]}"
                cols["dup_similarity"][r] = float(sim[k])
    return cols


def decide(ctx: RunContext, scored: Scored, reference: pa.Table | None) -> tuple[dict[str, list], Threshold, np.ndarray]:
    """Threshold, flags, duplicates and first actions: the decision columns, and which rows
    to augment."""
    table, s = scored.table, ctx.settings
    ok = ok_mask(table)
    values = score_values(table, s.score)
    ref = score_values(reference, s.score)[ok_mask(reference)] if reference is not None else None
    threshold = s.flag.threshold_for(values[ok], ref)
    low = band_low(ref if ref is not None else values[ok], s.remediation.accept_band)
    threshold = replace(threshold, details={**threshold.details, "accept_band": [low, threshold.value],
                                            "accept_band_quantile": s.remediation.accept_band,
                                            "accept_band_of": "reference" if ref is not None else "dataset"})
    flagged = flag(values, threshold) & ok
    cols = dedup(ctx, scored, ok, values)
    action, reason, augment = plan(ok, flagged, cols["dup_of"], s.remediation)
    n = table.num_rows
    cols.update({
        "flagged": [bool(f) if o else None for f, o in zip(flagged, ok)],
        "flag_reason": [threshold.reason(v, s.score) if f else None for v, f in zip(values, flagged)],
        "action": action, "action_reason": reason,
        "augment_preset": [None] * n, "augment_tries": [None] * n,
        "augmented_score": [None] * n, "augmentation": [None] * n, "augmented_png": [None] * n,
    })
    return cols, threshold, augment


def read_selected(source: Source, ids: set[str], spec: ImageSpec) -> dict[str, tuple[Any, str]]:
    """The full-size images (model mode) and sha256 of the selected ids, in one pass."""
    found = {}
    for item in source:
        if item.id in ids:
            try:
                data = item.read()
                found[item.id] = (open_image(data, spec), hashlib.sha256(data).hexdigest())
            except (Rejected, OSError) as e:  # changed since scoring: not augmented
                log.warning("cannot re-read %s for augmentation: %s", item.path, e)
    return found


def remediate(ctx: RunContext, table: pa.Table, cols: dict[str, list], augment: np.ndarray,
              threshold: Threshold, progress: Callable[[int], None] | None = None) -> None:
    """Augment and re-score the rows marked for augmentation; settle their actions in `cols`."""
    rows = {table.column("id")[int(r)].as_py(): int(r) for r in np.where(augment)[0]}
    if not rows:
        return
    folder = ctx.staging / "augmented"
    folder.mkdir(exist_ok=True)
    images = read_selected(ctx.source, set(rows), ctx.spec)
    r = ctx.settings.remediation
    low = threshold.details["accept_band"][0]
    band = f"[{'-inf' if low is None else format(low, '.4g')}, {threshold.value:.4g}]"
    results = augment_and_rescore(images, ctx.model.score_fn, ctx.spec, ctx.scorer, threshold, low,
                                  ctx.settings.score, r, folder, ctx.settings.batch_size,
                                  ctx.settings.device, progress)
    for id_, row in rows.items():
        a = results.get(id_)
        if a is None:
            cols["action"][row], cols["action_reason"][row] = "dropped", "could not be re-read for augmentation"
            continue
        cols["augment_preset"][row], cols["augment_tries"][row] = a.preset, a.tries
        cols["augmented_score"][row], cols["augmentation"][row] = a.score, record_json(a)
        if a.accepted:
            cols["action"][row] = "augmented"
            cols["action_reason"][row] = f"{a.preset} augmentation re-scored {a.score:.4g}, inside the accept band {band}"
            cols["augmented_png"][row] = str(a.png)
        else:
            cols["action"][row] = "dropped" if r.on_failure == "drop" else "kept"
            cols["action_reason"][row] = (f"no augmentation in {a.tries} tries scored inside the accept band {band} "
                                          f"(last {a.preset} {a.score:.4g}: {a.verdict}); on failure: {r.on_failure}")


def decided_table(table: pa.Table, cols: dict[str, list]) -> pa.Table:
    for f in DECISION_SCHEMA:
        table = table.append_column(f, pa.array(cols[f.name], f.type))
    return table


def write_cleaned(ctx: RunContext, decided: pa.Table) -> list[str]:
    """Stream the source again and write kept and augmented images to staging/cleaned/ in the
    datasets Image layout, sharded. Returns ids whose bytes changed since scoring (not written)."""
    cols = {c: decided.column(c).to_pylist() for c in ("id", "action", "sha256", ctx.settings.score,
                                                        "augmented_png", "augmented_score")}
    wanted = {cols["id"][i]: i for i, a in enumerate(cols["action"]) if a in ("kept", "augmented")}
    out = ctx.staging / "cleaned"
    out.mkdir()
    n_files = max(1, -(-len(wanted) // ctx.settings.shard_rows))
    shard, writer, changed = 0, None, []
    for item in ctx.source:
        i = wanted.get(item.id)
        if i is None:
            continue
        try:
            data = item.read()
        except (Rejected, OSError):
            data = b""
        if hashlib.sha256(data).hexdigest() != cols["sha256"][i]:
            changed.append(item.id)
            continue
        name, value = os.path.basename(item.path) or item.id, cols[ctx.settings.score][i]
        if cols["action"][i] == "augmented":
            data = Path(cols["augmented_png"][i]).read_bytes()
            name, value = os.path.splitext(name)[0] + ".aug.png", cols["augmented_score"][i]
        if writer is None or writer.count >= ctx.settings.shard_rows:
            if writer is not None:
                writer.commit()
            writer = AtomicParquetWriter(out / f"train-{shard:05d}-of-{n_files:05d}.parquet",
                                         cleaned_schema(), {}, ctx.settings.row_group_rows)
            shard += 1
        writer.write([{"image": {"bytes": data, "path": name}, "id": item.id, "sha256": cols["sha256"][i],
                       "action": cols["action"][i], "log_volume_growth": value}])
    if writer is not None:
        writer.commit()
    return changed


def mark_changed(decided: pa.Table, changed: list[str]) -> pa.Table:
    """Inputs whose bytes changed between scoring and writing become rejected rows."""
    if not changed:
        return decided
    hit = np.isin(np.array(decided.column("id").to_pylist(), dtype=object), list(changed))
    for name, value in (("status", "rejected"), ("reject_reason", "changed_during_run"), ("action", "rejected")):
        col = [value if h else c for c, h in zip(decided.column(name).to_pylist(), hit)]
        decided = decided.set_column(decided.schema.get_field_index(name), name,
                                     pa.array(col, decided.schema.field(name).type))
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
    decided = decided.drop_columns(["augmented_png"])
    for name, table in (("scores.parquet", decided),
                        ("flagged.parquet", decided.filter(pc.equal(decided.column("flagged"), True)))):
        with AtomicParquetWriter(ctx.staging / name, table.schema, metadata) as w:
            w.write_table(table)


def write_embeddings(ctx: RunContext, decided: pa.Table, scored: Scored) -> None:
    """embeddings.parquet (id, action, embedding of what the cleaned set holds) and index.faiss.

    The vectors belong to the rows that decoded at scoring time (scored.table's ok rows, in
    order); a row rejected since (its input changed during the run) is left out with its vector.
    """
    import faiss

    if scored.vectors is None:
        return
    at_scoring = ok_mask(scored.table)
    rows = [dict(zip(("id", "action", "png"), r)) for r, o in zip(zip(
        decided.column("id").to_pylist(), decided.column("action").to_pylist(),
        decided.column("augmented_png").to_pylist()), at_scoring) if o]
    keep = np.array([r["action"] != "rejected" for r in rows], dtype=bool)
    vectors = scored.vectors[keep].copy()
    rows = [r for r, k in zip(rows, keep) if k]
    for k, r in enumerate(rows):
        if r["action"] == "augmented":  # the cleaned set holds the augmentation: embed that
            x = decode_image(Path(r["png"]).read_bytes(), ctx.spec)[None].to(ctx.settings.device)
            vectors[k] = ctx.embedder(x).cpu().numpy()[0]
    d = scored.vectors.shape[1]
    table = pa.table({"id": [r["id"] for r in rows], "action": [r["action"] for r in rows],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), d)})
    with AtomicParquetWriter(ctx.staging / EMBEDDINGS, table.schema, {"embedder": ctx.embedder.name}) as w:
        w.write_table(table)
    index = ctx.index if ctx.index is not None else build_index(ctx.embedder.search_view(scored.vectors))
    faiss.write_index(to_cpu(index), str(ctx.staging / "index.faiss"))


def versions() -> dict[str, str]:
    import albumentations
    import diffusers
    import faiss
    import torchdiffeq

    return {"memclean": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "torchdiffeq": torchdiffeq.__version__,
            "pyarrow": pa.__version__, "numpy": np.__version__, "faiss": faiss.__version__,
            "albumentations": albumentations.__version__}


def manifest(ctx: RunContext, decided: pa.Table, threshold: Threshold, reference: pa.Table | None,
             out: Path) -> dict[str, Any]:
    reasons = Counter(r for r in decided.column("reject_reason").to_pylist() if r)
    c = counts(decided)
    t = threshold.to_dict()
    t["realised_flag_rate"] = c["flagged"] / c["scored"] if c["scored"] else None
    t["score"] = ctx.settings.score
    dups = [d for d in decided.column("dup_cluster").to_pylist() if d is not None]
    return {
        "counts": c,
        "reject_reasons": dict(sorted(reasons.items())),
        "threshold": t,
        "dedup": {"embedder": ctx.embedder.name, "threshold": ctx.dup_threshold, "flip": ctx.settings.dedup_flip,
                  "clusters": len(set(dups)), "in_clusters": len(dups),
                  "index": type(ctx.index).__name__ if ctx.index is not None else None,
                  "index_on_gpu": bool(ctx.index is not None and on_gpu(ctx.index)),
                  "threshold_meaning": "cosine similarity of the embeddings (pixel: correlation of 32x32 "
                                       "blurred grey thumbnails, maximised over shifts of up to 1/32 of the "
                                       "image or one image pixel, whichever is larger); pairs at or above it "
                                       "are duplicates", "against": ctx.settings.against},
        "reference": None if reference is None else {"path": ctx.settings.reference, "input": reference.num_rows,
                                                     "scored": int(ok_mask(reference).sum())},
        "model": {"path": str(ctx.model.checkpoint.root), "fingerprint": ctx.model.fingerprint,
                  "layout": ctx.model.checkpoint.layout, "variant": ctx.model.checkpoint.variant,
                  "data_range": list(ctx.model.data_range), "bits_per_dim_offset": bits_offset(ctx.model.data_range),
                  "scheduler": ctx.model.scheduler_class, "channels": ctx.model.channels,
                  "sample_size": list(ctx.model.sample_size)},
        "data": {"path": ctx.source.path, "kind": ctx.source.kind},
        "settings": {"scorer": ctx.scorer.to_dict(), "clean": asdict(ctx.settings)},
        "versions": versions(),
        "timings_s": ctx.timings,
        "peak_rss_mb": ctx.peak_rss_mb,
        "scoring": {"scored_fresh": sum(v["fresh"] for v in ctx.scoring.values()),
                    "reused": sum(v["reused"] for v in ctx.scoring.values()),
                    "by_source": ctx.scoring, "cache_dir": ctx.job.cache_dir if ctx.job else None},
        "out": str(out),
    }


def start_run(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike,
              scorer: ScorerSettings, settings: CleanSettings, allow_pickle: bool = False,
              overwrite: bool = False, cache_dir: str | os.PathLike | None = None) -> RunContext:
    """Validate everything, load the model, open a staging folder: nothing is scored yet."""
    out = Path(out)
    check_output_dir(out, overwrite)
    source = discover(data, settings.image_column)
    if settings.reference:
        discover(settings.reference, settings.image_column)
    loaded = shared_model(str(model), allow_pickle, settings)
    embedder = make_embedder(settings.embedder, loaded, settings.embed_size, settings.device)
    if settings.against:
        check_against(settings.against, embedder)
    staging = staging_dir(out)
    job = ScoreJob(str(model), allow_pickle, scorer, settings, str(staging),
                   None if cache_dir is None else str(cache_dir))
    return RunContext(source, loaded, scorer, settings, staging, embedder, job=job, out=out, overwrite=overwrite)


def finish_run(ctx: RunContext, scored: Scored, reference: Scored | None,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Flag, dedup, remediate, write every output and move the run into place."""
    with Stage(ctx, "flag_and_dedup"):
        ref_table = None if reference is None else reference.table
        cols, threshold, augment = decide(ctx, scored, ref_table)
    with Stage(ctx, "remediate"):
        remediate(ctx, scored.table, cols, augment, threshold, progress)
    decided = decided_table(scored.table, cols)
    with Stage(ctx, "write_cleaned"):
        decided = mark_changed(decided, write_cleaned(ctx, decided))
    with Stage(ctx, "write_tables"):
        meta = {"settings": ctx.scorer.to_dict(), "threshold": threshold.to_dict(),
                "model_fingerprint": ctx.model.fingerprint}
        write_tables(ctx, decided, meta)
        if ref_table is not None:
            with AtomicParquetWriter(ctx.staging / "reference_scores.parquet", ref_table.schema, meta) as w:
                w.write_table(ref_table)
        write_embeddings(ctx, decided, scored)
    result = manifest(ctx, decided, threshold, ref_table, ctx.out)
    write_json_atomic(ctx.staging / "manifest.json", result)
    with Stage(ctx, "report"):
        write_report_assets(ctx, decided)
        write_report(ctx.staging)
    for scratch in ("shards", "augmented"):
        shutil.rmtree(ctx.staging / scratch, ignore_errors=True)
    commit_dir(ctx.staging, ctx.out, ctx.overwrite)
    return result


def write_report_assets(ctx: RunContext, decided: pa.Table) -> None:
    """Thumbnails of the images the report shows (originals re-read in one pass)."""
    cols = ["id", "status", "flagged", "dup_cluster", "dup_of", "action", "augmented_png", ctx.settings.score]
    rows = decided.select(cols).to_pylist()
    wanted = ids_to_show(rows, ctx.settings.score)
    images = {i: img for i, (img, _) in read_selected(ctx.source, wanted, ctx.spec).items()}
    augmented = {r["id"]: Path(r["augmented_png"]).read_bytes() for r in rows
                 if r["id"] in wanted and r["action"] == "augmented" and r["augmented_png"]}
    write_thumbnails(ctx.staging, images, augmented)


def abort_run(ctx: RunContext) -> None:
    shutil.rmtree(ctx.staging, ignore_errors=True)


def run_clean(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike,
              scorer: ScorerSettings = ScorerSettings(), settings: CleanSettings = CleanSettings(),
              allow_pickle: bool = False, overwrite: bool = False,
              progress: Callable[[int], None] | None = None,
              cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The whole clean run into `out`, in this process; returns the manifest."""
    ctx = start_run(data, model, out, scorer, settings, allow_pickle, overwrite, cache_dir)
    try:
        scored = {}
        sources = [("input", ctx.source, True)]
        if settings.reference:
            sources.append(("reference", discover(settings.reference, settings.image_column), False))
        for prefix, source, embed in sources:
            with Stage(ctx, stage_name(prefix)):
                scored[prefix], results = score_source(ctx.job, source, prefix, embed, settings.shard_size, progress)
            scoring_summary(ctx, prefix, results)
        return finish_run(ctx, scored["input"], scored.get("reference"))
    except BaseException:
        abort_run(ctx)
        raise
