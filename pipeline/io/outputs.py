"""The files of a clean run, written into its staging folder: cleaned/ (the dataset for
retraining), scores.parquet and flagged.parquet, embeddings.parquet and index.faiss; and the
reading of an earlier output's embeddings (--against).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.data import ImageSpec, Rejected, Source, decode_image
from pipeline.io.store import (DECISION_SCHEMA, AtomicParquetWriter, OutputSettings, cleaned_schema,
                               ok_mask)

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.parquet"  # id, action, embedding: what --against reads
KEPT = ("kept", "augmented")  # the actions whose images the cleaned dataset holds


def decided_table(table: pa.Table, cols: dict[str, list]) -> pa.Table:
    """The score table with the decision columns (DECISION_SCHEMA) appended."""
    for f in DECISION_SCHEMA:
        table = table.append_column(f, pa.array(cols[f.name], f.type))
    return table


def replace_column(table: pa.Table, name: str, values: list) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def write_cleaned(folder: Path, source: Source, decided: pa.Table, score: str, settings: OutputSettings) -> set[str]:
    """Stream the source again and write kept and augmented images to folder/ in the datasets
    Image layout, sharded. Returns the ids whose bytes changed since scoring (not written)."""
    cols = {c: decided.column(c).to_pylist() for c in ("id", "action", "sha256", score, "augmented_png",
                                                        "augmented_score")}
    wanted = {cols["id"][i]: i for i, a in enumerate(cols["action"]) if a in KEPT}
    folder.mkdir()
    n_files = max(1, -(-len(wanted) // settings.shard_rows))
    shard, writer, changed = 0, None, set()
    for item in source:
        i = wanted.get(item.id)
        if i is None:
            continue
        try:
            data = item.read()
        except (Rejected, OSError):
            data = b""
        if hashlib.sha256(data).hexdigest() != cols["sha256"][i]:
            changed.add(item.id)
            continue
        name, value = os.path.basename(item.path) or item.id, cols[score][i]
        if cols["action"][i] == "augmented":
            data = Path(cols["augmented_png"][i]).read_bytes()
            name, value = os.path.splitext(name)[0] + ".aug.png", cols["augmented_score"][i]
        if writer is None or writer.count >= settings.shard_rows:
            if writer is not None:
                writer.commit()
            writer = AtomicParquetWriter(folder / f"train-{shard:05d}-of-{n_files:05d}.parquet",
                                         cleaned_schema(), {}, settings.row_group_rows)
            shard += 1
        writer.write([{"image": {"bytes": data, "path": name}, "id": item.id, "sha256": cols["sha256"][i],
                       "action": cols["action"][i], "log_volume_growth": value}])
    if writer is not None:
        writer.commit()
    return changed


def write_tables(folder: Path, decided: pa.Table, metadata: dict[str, Any]) -> None:
    """scores.parquet (every input) and flagged.parquet (the flagged rows)."""
    decided = decided.drop_columns(["augmented_png"])
    for name, table in (("scores.parquet", decided),
                        ("flagged.parquet", decided.filter(pc.equal(decided.column("flagged"), True)))):
        with AtomicParquetWriter(folder / name, table.schema, metadata) as w:
            w.write_table(table)


def write_embeddings(folder: Path, decided: pa.Table, scored_table: pa.Table, vectors: np.ndarray,
                     embed: Callable[[bytes], np.ndarray], embedder_name: str) -> None:
    """embeddings.parquet: id, action and the embedding of what the cleaned set holds.

    `vectors` belong to the rows that decoded at scoring time (scored_table's ok rows, in
    order); a row rejected since (its input changed during the run) is left out with its vector.
    An augmented row holds its variant's embedding (`embed` of its PNG bytes).
    """
    at_scoring = ok_mask(scored_table)
    names = ("id", "action", "augmented_png")
    rows = [dict(zip(names, r)) for r, o in zip(zip(*(decided.column(n).to_pylist() for n in names)), at_scoring) if o]
    keep = np.array([r["action"] != "rejected" for r in rows], dtype=bool)
    out = vectors[keep].copy()
    rows = [r for r, k in zip(rows, keep) if k]
    for k, r in enumerate(rows):
        if r["action"] == "augmented":
            out[k] = embed(Path(r["augmented_png"]).read_bytes())
    table = pa.table({"id": [r["id"] for r in rows], "action": [r["action"] for r in rows],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(out.ravel(), pa.float32()),
                                                                     vectors.shape[1])})
    with AtomicParquetWriter(folder / EMBEDDINGS, table.schema, {"embedder": embedder_name}) as w:
        w.write_table(table)


def embed_png(embedder, spec: ImageSpec, device: str) -> Callable[[bytes], np.ndarray]:
    """PNG bytes -> the embedder's vector of the image as the model sees it."""
    return lambda data: embedder(decode_image(data, spec)[None].to(device)).cpu().numpy()[0]


def check_against(against: str, embedder_name: str) -> dict[str, Any]:
    """The manifest of an earlier output (--against), checked before any work: it must be a
    memclean output with embeddings from the same embedder."""
    prev = Path(against)
    try:
        manifest = json.loads((prev / "manifest.json").read_text())
        pq.read_schema(prev / EMBEDDINGS)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"--against {str(prev)!r} is not a memclean output with embeddings: {e}") from e
    if manifest.get("dedup", {}).get("embedder") != embedder_name:
        raise ValueError(f"--against {str(prev)!r} was embedded with {manifest.get('dedup', {}).get('embedder')!r}, "
                         f"this run with {embedder_name!r}: they cannot be compared")
    return manifest


def earlier_survivors(against: str, embedder_name: str) -> tuple[list[str], np.ndarray]:
    """Ids and embeddings of the kept and augmented images of an earlier output (--against)."""
    check_against(against, embedder_name)
    table = pq.read_table(Path(against) / EMBEDDINGS)
    keep = np.isin(np.array(table.column("action").to_pylist(), dtype=object), list(KEPT))
    ids = [i for i, k in zip(table.column("id").to_pylist(), keep) if k]
    if not keep.any():
        return ids, np.zeros((0, 1), np.float32)
    return ids, np.array(table.column("embedding").to_pylist(), dtype=np.float32)[keep]
