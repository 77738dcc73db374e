"""`memclean dedup`: the duplicate search alone, with no model and no scoring.

For users who come from imagededup or fastdup: the same embedders (pixel, torchscript:PATH),
clusters, keepers, --against and outputs as a clean run's duplicate stage, written the same way
(staged, locked, committed whole). Without scores, a cluster keeps its first member by id and
drops the others; nothing is flagged. Outputs: scores.parquet (every input: identity, status,
the duplicate and action columns; the score columns are null), cleaned/, embeddings.parquet,
index.faiss, manifest.json (`"kind": "dedup"`) and report.html (its duplicate sections).
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from pipeline.decide.dedup import DedupSettings, check_faiss
from pipeline.decide.embeddings import Embedder, make_embedder
from pipeline.io.data import DecodeSettings, InputSettings, Source, batched, discover
from pipeline.io.manifest import manifest
from pipeline.decide.remediate import RemediationSettings, plan
from pipeline.io.outputs import INDEX, check_against, decided_table, embed_png, write_cleaned, write_embeddings, \
    write_tables
from pipeline.io.report import write_report, write_report_assets
from pipeline.io.store import SCORE_SCHEMA, OutputLock, OutputSettings, check_output_dir, commit_dir, \
    ok_mask, staging_dir, write_json_atomic
from pipeline.fields import section
from pipeline.run.lifecycle import dedup_record, reject_changed_rows, search_duplicates
from pipeline.run.settings import SettingsMixin
from pipeline.score.scoring import base_row

log = logging.getLogger(__name__)

SCORE = "log_volume_growth"  # the score column the shared writers read (null here)


@dataclass(frozen=True)
class DedupRunSettings(SettingsMixin):
    """`memclean dedup`: images in, duplicate clusters and a deduplicated dataset out."""

    input: InputSettings = section()
    output: OutputSettings = section()
    decode: DecodeSettings = section(DecodeSettings)
    dedup: DedupSettings = section(DedupSettings)

    def __post_init__(self) -> None:
        if self.dedup.embedder == "unet":
            raise ValueError("--embedder unet uses a diffusion model's features: memclean dedup has no model "
                             "(use pixel or torchscript:PATH, or memclean clean --model)")


def embed_source(source: Source, settings: DedupRunSettings, embedder: Embedder, folder: Path,
                 progress: Callable[[int], None] | None = None) -> tuple[pa.Table, np.ndarray | None, np.ndarray | None]:
    """One pass: a row per input, and the embeddings of the decodable ones (and of their mirror
    images with --dedup-flip) appended to memory-mapped files in `folder`, in order."""
    spec = settings.decode.spec(settings.input)
    rows, counts, files = [], 0, {}
    for batch in batched(source, spec, settings.decode.batch_size):
        rows += [base_row(d) for d in batch]
        pixels = [d.pixels for d in batch if d.pixels is not None]
        if pixels:
            x = torch.stack(pixels).to(settings.decode.device)
            with torch.no_grad():
                for name, flip in (("vectors", False), ("flipped", True)):
                    if flip and not settings.dedup.dedup_flip:
                        continue
                    v = np.ascontiguousarray(embedder(x, flip=flip).cpu().numpy(), dtype=np.float32)
                    if name not in files:
                        files[name] = (open(folder / f"{name}.f32", "wb"), v.shape[1])
                    files[name][0].write(v.tobytes())
            counts += len(pixels)
        if progress:
            progress(len(batch))
    out = {}
    for name, (f, d) in files.items():
        f.close()
        out[name] = np.memmap(folder / f"{name}.f32", np.float32, "r", shape=(counts, d))
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCORE_SCHEMA} for r in rows], SCORE_SCHEMA)
    return table, out.get("vectors"), out.get("flipped")


def dedup_columns(table: pa.Table, vectors: np.ndarray | None, flipped: np.ndarray | None,
                  settings: DedupRunSettings, embedder: Embedder, threshold: float,
                  index_path: Path) -> tuple[dict[str, list], Any]:
    """The decision columns: duplicates dropped (keeper: first by id, no risk), the rest kept
    (remediate.plan with --action dedup and nothing flagged); the index goes to index_path."""
    n, ok = table.num_rows, ok_mask(table)
    cols: dict[str, list] = {"dup_cluster": [None] * n, "dup_of": [None] * n, "dup_similarity": [None] * n}
    index = None
    if vectors is not None and len(vectors):
        cols, index = search_duplicates(vectors, flipped, table, ok, np.zeros(n), threshold, embedder,
                                        settings.dedup, settings.decode.device, index_path)
    action, reason, _ = plan(ok, np.zeros(n, bool), cols["dup_of"], RemediationSettings(action="dedup"))
    cols.update({"flagged": [False if o else None for o in ok], "flag_reason": [None] * n,
                 "action": action, "action_reason": reason,
                 **{k: [None] * n for k in ("augment_preset", "augment_tries", "augmented_score", "augmentation",
                                            "augmented_png")}})
    return cols, index


def run_dedup(settings: DedupRunSettings, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The duplicate search into settings.output.out; returns the manifest."""
    out = Path(settings.output.out)
    lock = OutputLock(out)
    staging = None
    try:
        check_output_dir(out, settings.output.overwrite)
        source = discover(settings.input.data, settings.input.image_column)
        spec = settings.decode.spec(settings.input)
        embedder = make_embedder(settings.dedup.embedder, None, settings.dedup.embed_size, settings.decode.device,
                                 image_side=settings.decode.image_size)
        check_faiss()  # before any scoring: the index is searched memory-mapped
        if settings.dedup.against:
            check_against(settings.dedup.against, embedder.name)
        threshold = embedder.default_threshold if settings.dedup.dup_threshold is None else settings.dedup.dup_threshold
        staging = staging_dir(out)
        scratch = staging / "shards"
        scratch.mkdir()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        table, vectors, flipped = embed_source(source, settings, embedder, scratch, progress)
        timings["embed"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        cols, index = dedup_columns(table, vectors, flipped, settings, embedder, threshold, staging / INDEX)
        timings["dedup"] = round(time.perf_counter() - t0, 3)
        decided = decided_table(table, cols)
        t0 = time.perf_counter()
        changed, cleaned_bytes = write_cleaned(staging / "cleaned", source, decided, SCORE, settings.output)
        decided = reject_changed_rows(decided, changed)
        write_tables(staging, decided, {"settings": settings.flat(), "kind": "dedup"})
        if vectors is not None:
            write_embeddings(staging, decided, table, vectors, embed_png(embedder, spec, settings.decode.device),
                             embedder.name)
        timings["write"] = round(time.perf_counter() - t0, 3)
        dedup = dedup_record(embedder, threshold, settings.dedup, index)
        result = manifest(decided, threshold={"policy": None, "value": None, "parameters": {}}, score=SCORE,
                          dedup=dedup, reference=None, reference_path=None, model=None,
                          data={"path": source.path, "kind": source.kind}, settings=settings.flat(),
                          timings=timings, peak_rss_mb={}, scoring={}, cache_dir=None, out=str(out),
                          image_bytes={"cleaned": cleaned_bytes})
        c = result["counts"]  # nothing is scored or flagged here: say what was decoded
        result.update(kind="dedup", threshold=None, counts={"input": c["input"], "decoded": c["scored"],
                                                           "kept": c["kept"], "dropped": c["dropped"],
                                                           "rejected": c["rejected"]})
        result["decode"] = {"channels": spec.channels, "sample_size": list(spec.size)}
        write_json_atomic(staging / "manifest.json", result)
        write_report_assets(staging, source, spec, decided, SCORE)
        write_report(staging)
        del vectors, flipped
        shutil.rmtree(scratch, ignore_errors=True)
        commit_dir(staging, out, settings.output.overwrite)
        return result
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        lock.release()
