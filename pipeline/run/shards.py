"""Sharded scoring: a source is cut into shards of --shard-size items; each shard is scored (or
its scores reused from the cache) into the run's staging folder by whichever worker runs it (a
thread, a process, a Dask worker), and the shards are gathered back in order.

On CUDA a process scores two shards at once (shard_threads): one shard's start (its first
batches decoded), its last batches' embeddings and its Parquet write overlap the other's network,
so a shard boundary does not leave the GPU idle. A lock per device keeps the network to one batch
at a time, so the two never compete for the GPU's memory; the batches stay exactly those of one
shard at a time. On the CPU one shard at a time: every solve already uses every core.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.decide.embeddings import Embedder
from pipeline.io.data import ImageSpec, Item, Source, batched
from pipeline.io.store import SCORE_SCHEMA, AtomicParquetWriter
from pipeline.run.resources import resources
from pipeline.run.settings import RunSettings
from pipeline.score.cache import ScoreCache, namespace
from pipeline.score.models import LoadedModel
from pipeline.score.ready import ready
from pipeline.score.scoring import image_spec, prepared, score_batch
from pipeline.score.volume import SCORER_VERSION


@dataclass
class Scored:
    """Pass one over a source: score rows, and embeddings of the decodable rows in order."""

    table: pa.Table
    vectors: np.ndarray | None  # [n_ok, d]
    flipped: np.ndarray | None  # [n_ok, d] of mirrored images, with --dedup-flip


@dataclass(frozen=True)
class ScoreJob:
    """Everything a worker needs to score shards (picklable, for Dask)."""

    settings: RunSettings
    staging: str  # the run's staging folder (shard files go to staging/shards/)


_READY = threading.Lock()  # one thread of a process loads and compiles a model; the others wait for it
_DEVICES: dict[str, threading.Lock] = {}  # one network at a time per device (device_lock)


def shard_threads(device: str) -> int:
    """Shards a process scores at once on `device`: 2 on CUDA (see the module docstring), else 1."""
    return 2 if torch.device(device).type == "cuda" else 1


def device_lock(device: str) -> threading.Lock:
    """The lock that keeps this process's scoring on `device` to one batch at a time."""
    with _READY:
        return _DEVICES.setdefault(str(torch.device(device)), threading.Lock())


def job_context(job: ScoreJob) -> tuple[LoadedModel, Embedder, ImageSpec, ScoreCache | None]:
    """The model (ready at the job's batch: compiled once per process where --compile says so),
    embedder, input spec and cache of a job (loaded once per process)."""
    s = job.settings
    with _READY:
        model = resources().model(s.model)
        ready(model, s.model, s.scorer)
    embedder = resources().embedder(s.dedup.embedder, model, s.dedup.embed_size, s.model.device)
    spec = image_spec(model, s.input.max_pixels, s.input.min_size)
    cache = None
    if s.cache.root is not None:
        key = namespace(model.fingerprint, {**s.scorer.to_dict(), "scorer_version": SCORER_VERSION}, asdict(spec))
        cache = resources().cache(s.cache.root, key)
    return model, embedder, spec, cache


def shard_name(prefix: str, k: int) -> str:
    return f"{prefix}-{k:06d}"


def score_shard(job: ScoreJob, items: Iterable[Item], name: str, embed: bool,
                progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score (or reuse cached scores of) one shard into staging/shards/name.parquet, with the
    embeddings of its decodable images in name.npy. Returns the name and counts."""
    model, embedder, spec, cache = job_context(job)
    s = job.settings
    folder = Path(job.staging) / "shards"
    folder.mkdir(exist_ok=True)
    rows, vectors, flipped = [], [], []
    network = device_lock(s.model.device)
    for batch in prepared(model, batched(items, spec, s.model.batch_size)):
        with network:
            batch_rows = score_batch(model, batch, s.scorer, s.model.device, progress, cache)
        rows += batch_rows
        # vectors for the rows that were scored (ok), in order: they pair with ok_mask later
        pixels = [d.pixels for d, r in zip(batch, batch_rows) if r["status"] == "ok"]
        if embed and pixels:
            with network:
                x = torch.stack(pixels).to(s.model.device)
                vectors.append(embedder(x).cpu().numpy())
                if s.dedup.dedup_flip:
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
    """The shards' rows concatenated in order into one Arrow IPC file, read back memory-mapped
    (staging/shards/NAME.arrow), and their vectors in one memory-mapped array
    (staging/shards/NAME.vectors.npy): no step holds every row or every vector in memory;
    what a step selects or computes from them is its own."""
    folder = Path(job.staging) / "shards"
    prefix = names[0].rsplit('-', 1)[0] if names else None  # input-000003 -> input
    table = SCORE_SCHEMA.empty_table()
    if names:
        target = folder / f"{prefix}.arrow"
        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_file(sink, pq.read_schema(folder / f"{names[0]}.parquet")) as w:
            for n in names:  # a row group at a time
                for batch in pq.ParquetFile(folder / f"{n}.parquet").iter_batches():
                    w.write_batch(batch)
        table = pa.ipc.open_file(pa.memory_map(str(target))).read_all()

    def stack(suffix: str) -> np.ndarray | None:
        parts = [folder / f"{n}.{suffix}" for n in names if (folder / f"{n}.{suffix}").exists()]
        if not parts:
            return None
        shapes = [np.load(p, mmap_mode="r").shape for p in parts]
        target = folder / f"{prefix}.{suffix.replace('npy', 'vectors.npy')}"
        out = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32,
                                        shape=(sum(sh[0] for sh in shapes), shapes[0][1]))
        row = 0
        for p, sh in zip(parts, shapes):
            out[row:row + sh[0]] = np.load(p, mmap_mode="r")
            row += sh[0]
        out.flush()
        del out
        return np.load(target, mmap_mode="r")
    return Scored(table, stack("npy"), stack("flip.npy"))


def score_shards(job: ScoreJob, prefix: str, shards: Iterable[Iterable[Item]], embed: bool,
                 progress: Callable[[int], None] | None = None, threads: int | None = None) -> list[dict[str, Any]]:
    """Score shards in this process, `threads` at once (default shard_threads of the job's
    device); the results in shard order."""
    threads = threads or shard_threads(job.settings.model.device)
    if threads == 1:
        return [score_shard(job, shard, shard_name(prefix, k), embed, progress) for k, shard in enumerate(shards)]
    with ThreadPoolExecutor(threads, thread_name_prefix="memclean-shard") as pool:
        return list(pool.map(lambda k_shard: score_shard(job, k_shard[1], shard_name(prefix, k_shard[0]), embed,
                                                         progress), enumerate(shards)))


def score_source(job: ScoreJob, source: Source, prefix: str, embed: bool,
                 progress: Callable[[int], None] | None = None) -> tuple[Scored, list[dict[str, Any]]]:
    """Score a whole source shard by shard in this process (the flow maps shards instead)."""
    results = score_shards(job, prefix, source.shards(job.settings.cache.shard_size), embed, progress)
    return gather(job, [r["name"] for r in results]), results
