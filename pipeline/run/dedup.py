"""`memclean dedup`: the duplicate search alone, with no model and no scoring.

For users who come from imagededup or fastdup: the same embedders (pixel, torchscript:PATH),
clusters, keepers, --against and outputs as a clean run's duplicate stage, written the same way
(a staged run: locked, timed, committed whole; run/staged.py) by the same steps. Without scores,
a cluster keeps its first member by id and drops the others; nothing is flagged. Outputs:
scores.parquet (every input: identity, status, the duplicate and action columns; the score
columns are null), cleaned/, embeddings.parquet, index.faiss, manifest.json (`"kind": "dedup"`)
and report.html (its duplicate sections).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.decide.chance import ChanceThreshold
from pipeline.decide.embeddings import Embedder, make_embedder
from pipeline.decide.index import check_faiss
from pipeline.decide.remediate import RemediationSettings
from pipeline.io.data import Source, batched, discover
from pipeline.io.manifest import manifest
from pipeline.io.outputs import INDEX, check_against, decided_table, embed_png, write_embeddings, write_tables
from pipeline.io.store import SCORE_SCHEMA, ok_mask
from pipeline.run.lifecycle import commit_with_report, decision_columns, dedup_record, search_duplicates, \
    write_dataset
from pipeline.run.settings import DedupRunSettings
from pipeline.run.staged import StagedRun
from pipeline.score.scoring import base_row

log = logging.getLogger(__name__)

SCORE = "log_volume_growth"  # the score column the shared writers read (null here)
DEDUP_ONLY = RemediationSettings(action="dedup")  # what a dedup run does with clusters and changed keepers


def decode_to_files(source: Source, spec, batch_size: int, arrays: Callable[[torch.Tensor], dict[str, np.ndarray]],
                    folder: Path, progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """One pass over `source`: a row per input (identity and status), and for each batch of the
    decodable images the `arrays` they give ({name: [B, d]}), appended to float32 files in
    `folder` and returned memory-mapped, in input order."""
    rows, counts, files = [], 0, {}
    for batch in batched(source, spec, batch_size):
        rows += [base_row(d) for d in batch]
        pixels = [d.pixels for d in batch if d.pixels is not None]
        if pixels:
            with torch.no_grad():
                for name, v in arrays(torch.stack(pixels)).items():
                    if name not in files:
                        files[name] = (open(folder / f"{name}.f32", "wb"), v.shape[1])
                    files[name][0].write(np.ascontiguousarray(v, dtype=np.float32).tobytes())
            counts += len(pixels)
        if progress:
            progress(len(batch))
    out = {}
    for name, (f, d) in files.items():
        f.close()
        out[name] = np.memmap(folder / f"{name}.f32", np.float32, "r", shape=(counts, d))
    return rows, out


def embed_source(source: Source, settings: DedupRunSettings, embedder: Embedder, folder: Path,
                 progress: Callable[[int], None] | None = None) -> tuple[pa.Table, np.ndarray | None, np.ndarray | None]:
    """One pass: a row per input, and the embeddings of the decodable ones (and of their mirror
    images with --dedup-flip) appended to memory-mapped files in `folder`, in order."""
    device, flip = settings.decode.device, settings.dedup.dedup_flip

    def arrays(x: torch.Tensor) -> dict[str, np.ndarray]:
        x = x.to(device)
        out = {"vectors": embedder(x).cpu().numpy()}
        if flip:
            out["flipped"] = embedder(x, flip=True).cpu().numpy()
        return out

    rows, out = decode_to_files(source, settings.decode.spec(settings.input), settings.decode.batch_size, arrays,
                                folder, progress)
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCORE_SCHEMA} for r in rows], SCORE_SCHEMA)
    return table, out.get("vectors"), out.get("flipped")


def dedup_columns(table: pa.Table, vectors: np.ndarray | None, flipped: np.ndarray | None,
                  settings: DedupRunSettings, embedder: Embedder,
                  index_path: Path, against: Sequence[str] = ()) -> tuple[dict[str, list], Any, ChanceThreshold]:
    """The decision columns: duplicates dropped (keeper: first by id, no risk), the rest kept
    (remediate.plan with --action dedup and nothing flagged); the index goes to index_path;
    `against`: check_against's list of earlier outputs.
    Also returns the threshold used (auto: measured on the dataset's own nearest neighbours)."""
    n, ok = table.num_rows, ok_mask(table)
    dup, index, threshold = search_duplicates(vectors, flipped, table, ok, np.zeros(n), embedder, settings.dedup,
                                              settings.decode.device, index_path, against=against)
    cols, _ = decision_columns(table, dup, np.zeros(n, bool), [None] * n, DEDUP_ONLY)
    return cols, index, threshold


def run_dedup(settings: DedupRunSettings, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The duplicate search into settings.output.out; returns the manifest."""
    with StagedRun(settings.output.out, settings.output.overwrite) as run:
        source = discover(settings.input.data, settings.input.image_column)
        source.skipped  # a folder's files that are not images: said now, recorded in the manifest
        spec = settings.decode.spec(settings.input)
        embedder = make_embedder(settings.dedup.embedder, None, settings.dedup.embed_size, settings.decode.device,
                                 image_side=settings.decode.image_size, channels=spec.channels)
        check_faiss()  # before any embedding: the index is searched memory-mapped
        against = check_against(settings.dedup.against, embedder.name) if settings.dedup.against else []
        scratch = run.staging / "shards"
        scratch.mkdir()
        with run.stage("embed"):
            table, vectors, flipped = embed_source(source, settings, embedder, scratch, progress)
        with run.stage("dedup"):
            cols, index, threshold = dedup_columns(table, vectors, flipped, settings, embedder, run.staging / INDEX,
                                                   against)
        decided, _, cleaned_bytes = write_dataset(run, source, decided_table(table, cols), set(), SCORE, DEDUP_ONLY,
                                                  settings.output, spool=False)
        with run.stage("write_tables"):
            write_tables(run.staging, decided, {"settings": settings.flat(), "kind": "dedup"})
            if vectors is not None:
                write_embeddings(run.staging, decided, table, vectors,
                                 embed_png(embedder, spec, settings.decode.device), embedder.name)
        del vectors, flipped

        def result() -> dict[str, Any]:
            m = manifest(decided, kind="dedup", run=run.record(), threshold=None, score=SCORE,
                         dedup=dedup_record(embedder, threshold, settings.dedup, index, against), reference=None,
                         reference_path=None, model=None, data=source.record(),
                         settings=settings.flat(), scoring={}, cache_dir=None, out=str(run.out),
                         image_bytes={"cleaned": cleaned_bytes})
            return {**m, "decode": {"channels": spec.channels, "sample_size": list(spec.size)}}
        return commit_with_report(run, source, spec, decided, SCORE, result, settings.guard, against)
