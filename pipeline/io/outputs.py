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
from pipeline.io.store import (DECISION_SCHEMA, IMAGE, AtomicParquetWriter, OutputSettings, cleaned_schema,
                               ok_mask, with_hf_features)

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.parquet"  # id, action, embedding: what --against reads
INDEX = "index.faiss"  # the FAISS index over the run's search views, memory-mapped while the run uses it
KEPT = ("kept", "augmented")  # the actions whose images the cleaned dataset holds


def decided_table(table: pa.Table, cols: dict[str, list]) -> pa.Table:
    """The score table with the decision columns (DECISION_SCHEMA) appended."""
    for f in DECISION_SCHEMA:
        table = table.append_column(f, pa.array(cols[f.name], f.type))
    return table


def replace_column(table: pa.Table, name: str, values: list) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def write_cleaned(folder: Path, source: Source, decided: pa.Table, score: str,
                  settings: OutputSettings) -> tuple[set[str], int]:
    """Stream the source again and write kept and augmented images to folder/ in the datasets
    Image layout, sharded. Returns the ids whose bytes changed since scoring (not written) and
    the image bytes written."""
    kept = decided.select(["id", "action", "sha256", score, "augmented_png", "augmented_score"]) \
        .filter(pc.is_in(decided.column("action"), pa.array(KEPT)))
    cols = {c: kept.column(c).combine_chunks() for c in kept.column_names}  # Arrow, read a row at a time
    wanted = {id_: i for i, id_ in enumerate(kept.column("id").to_pylist())}
    folder.mkdir()
    n_files = max(1, -(-len(wanted) // settings.shard_rows))
    shard, writer, changed, total = 0, None, set(), 0
    for item in source:
        i = wanted.get(item.id)
        if i is None:
            continue
        try:
            data = item.read()
        except (Rejected, OSError):
            data = b""
        sha256, action = cols["sha256"][i].as_py(), cols["action"][i].as_py()
        if hashlib.sha256(data).hexdigest() != sha256:
            changed.add(item.id)
            continue
        name, value = os.path.basename(item.path) or item.id, cols[score][i].as_py()
        if action == "augmented":
            data = Path(cols["augmented_png"][i].as_py()).read_bytes()
            name, value = os.path.splitext(name)[0] + ".aug.png", cols["augmented_score"][i].as_py()
        if writer is None or writer.count >= settings.shard_rows:
            if writer is not None:
                writer.commit()
            writer = AtomicParquetWriter(folder / f"train-{shard:05d}-of-{n_files:05d}.parquet",
                                         cleaned_schema(), {}, settings.row_group_rows)
            shard += 1
        writer.write([{"image": {"bytes": data, "path": name}, "id": item.id, "sha256": sha256,
                       "action": action, "log_volume_growth": value}])
        total += len(data)
    if writer is not None:
        writer.commit()
    return changed, total


def write_tables(folder: Path, decided: pa.Table, metadata: dict[str, Any]) -> None:
    """scores.parquet: every input, light (no image bytes; see write_flagged for those)."""
    decided = decided.drop_columns(["augmented_png"])
    with AtomicParquetWriter(folder / "scores.parquet", decided.schema, metadata) as w:
        w.write_table(decided)


ROW_GROUP_BYTES = 64 << 20  # image bytes per row group of flagged.parquet, at most (about)


def flagged_order(decided: pa.Table, score: str) -> pa.Table:
    """The flagged rows, highest score first (ties by id)."""
    flagged = decided.filter(pc.equal(decided.column("flagged"), True))
    return flagged.sort_by([(score, "descending"), ("id", "ascending")])


def spool_images(source: Source, wanted: dict[str, str], path: Path) -> tuple[dict[str, int], int]:
    """The bytes of the wanted inputs (id -> sha256 at scoring), in one pass over the source,
    into an Arrow IPC file at `path` (memory-mapped when read back, so they never all sit in
    memory). Returns each id's row there and the bytes spooled; an input whose bytes changed
    since scoring is left out."""
    schema = pa.schema([("bytes", pa.binary()), ("path", pa.string())])
    rows: dict[str, int] = {}
    total = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for item in source:
            if item.id not in wanted:
                continue
            try:
                data = item.read()
            except (Rejected, OSError):
                continue
            if hashlib.sha256(data).hexdigest() != wanted[item.id]:
                log.warning("%s changed since it was scored: flagged.parquet shows no image for it", item.path)
                continue
            writer.write_table(pa.table({"bytes": [data], "path": [os.path.basename(item.path) or item.id]}, schema))
            rows[item.id] = len(rows)
            total += len(data)
    return rows, total


def write_flagged(folder: Path, source: Source, decided: pa.Table, score: str, metadata: dict[str, Any],
                  row_group_rows: int = 256) -> int:
    """flagged.parquet: the flagged rows, highest score first, with `image` (the original file)
    and `augmented_image` (the accepted variant) in the datasets Image layout and the
    'huggingface' metadata, so datasets.load_dataset('parquet') decodes both. Written in row
    groups of at most row_group_rows rows and about ROW_GROUP_BYTES of images, the original
    bytes read back from a memory-mapped spool. Returns the image bytes written."""
    flagged = flagged_order(decided, score)
    ids = flagged.column("id").to_pylist()
    spool = folder / ".flagged-images.arrow"
    rows, total = spool_images(source, dict(zip(ids, flagged.column("sha256").to_pylist())), spool)
    pngs = flagged.column("augmented_png").to_pylist()
    schema = with_hf_features(pa.schema([("image", IMAGE), ("augmented_image", IMAGE)]
                                        + [f for f in flagged.schema if f.name != "augmented_png"]))
    per_group = max(1, min(row_group_rows, ROW_GROUP_BYTES * max(len(rows), 1) // max(total, 1)))
    with pa.memory_map(str(spool)) as mm:
        images = pa.ipc.open_file(mm).read_all()
        with AtomicParquetWriter(folder / "flagged.parquet", schema, metadata, per_group) as w:
            for start in range(0, len(ids), per_group):
                chunk = flagged.slice(start, per_group)
                take = [rows.get(i) for i in ids[start:start + per_group]]
                original = images.take(pa.array(take, pa.int64())).to_pylist() if take else []
                augmented = [None if p is None else {"bytes": Path(p).read_bytes(), "path": Path(p).name}
                             for p in pngs[start:start + per_group]]
                total += sum(len(a["bytes"]) for a in augmented if a)
                w.write_table(chunk.drop_columns(["augmented_png"])
                              .add_column(0, "augmented_image", pa.array(augmented, IMAGE))
                              .add_column(0, "image", pa.array([o if o and o["bytes"] is not None else None
                                                                for o in original], IMAGE)))
    spool.unlink()
    return total


def write_embeddings(folder: Path, decided: pa.Table, scored_table: pa.Table, vectors: np.ndarray,
                     embed: Callable[[bytes], np.ndarray], embedder_name: str, chunk: int = 1024) -> None:
    """embeddings.parquet: id, action and the embedding of what the cleaned set holds.

    `vectors` belong to the rows that decoded at scoring time (scored_table's ok rows, in
    order); a row rejected since (its input changed during the run) is left out with its vector.
    An augmented row holds its variant's embedding (`embed` of its PNG bytes).
    """
    rows = decided.select(["id", "action", "augmented_png"]).filter(ok_mask(scored_table))  # one per vector
    keep = np.flatnonzero(pc.fill_null(pc.not_equal(rows.column("action"), "rejected"), True)
                          .to_numpy(zero_copy_only=False))
    d = vectors.shape[1]
    schema = pa.schema([("id", pa.string()), ("action", pa.string()), ("embedding", pa.list_(pa.float32(), d))])
    with AtomicParquetWriter(folder / EMBEDDINGS, schema, {"embedder": embedder_name},
                             use_dictionary=["id", "action"]) as w:
        for start in range(0, len(keep), chunk):  # a chunk of rows and vectors in memory at a time
            idx = keep[start:start + chunk]
            part = rows.take(pa.array(idx, pa.int64()))
            out = np.array(vectors[idx], dtype=np.float32)
            for k, (action, png) in enumerate(zip(part.column("action").to_pylist(),
                                                  part.column("augmented_png").to_pylist())):
                if action == "augmented":
                    out[k] = embed(Path(png).read_bytes())
            w.write_table(pa.table({"id": part.column("id"), "action": part.column("action"),
                                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(out.ravel(), pa.float32()), d)},
                                   schema))


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
    kept = table.filter(pc.is_in(table.column("action"), pa.array(KEPT)))
    if not kept.num_rows:
        return [], np.zeros((0, 1), np.float32)
    embedding = kept.column("embedding").combine_chunks()
    d = embedding.type.list_size
    vectors = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    return kept.column("id").to_pylist(), vectors
