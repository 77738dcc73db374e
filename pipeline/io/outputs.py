"""The files of a clean run, written into its staging folder: cleaned/ (the dataset for
retraining), scores.parquet and flagged.parquet, embeddings.parquet and index.faiss; and the
reading of an earlier output's embeddings (--against).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.data import ImageSpec, Source, decode_image, read_verified
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


class CleanedFiles:
    """cleaned/, a row at a time: files of settings.shard_rows rows in the datasets Image layout,
    each written atomically and named train-KKKKK-of-NNNNN.parquet once the count is known."""

    def __init__(self, folder: Path, settings: OutputSettings):
        self.folder, self.settings = folder, settings
        folder.mkdir()
        self.parts: list[Path] = []
        self.writer: AtomicParquetWriter | None = None
        self.bytes = 0  # image bytes written

    def write(self, image: dict[str, Any], id_: str, sha256: str, action: str, volume: float | None,
              value: float | None, score: str) -> None:
        if self.writer is None or self.writer.count >= self.settings.shard_rows:
            self._commit()
            self.parts.append(self.folder / f".part-{len(self.parts):05d}.parquet")
            self.writer = AtomicParquetWriter(self.parts[-1], cleaned_schema(), {}, self.settings.row_group_rows)
        self.writer.write([{"image": image, "id": id_, "sha256": sha256, "action": action, "log_volume_growth": volume,
                            "judged_score": value, "judged_by": score}])
        self.bytes += len(image["bytes"])

    def _commit(self) -> None:
        if self.writer is not None:
            self.writer.commit()
            self.writer = None

    def close(self) -> None:
        self._commit()
        for k, part in enumerate(self.parts):
            os.replace(part, self.folder / f"train-{k:05d}-of-{len(self.parts):05d}.parquet")


class ImageSpool:
    """Original bytes of chosen inputs appended to an Arrow IPC file, memory-mapped when read back
    (`images`), so they never all sit in memory; `rows` maps each id to its row there."""

    SCHEMA = pa.schema([("bytes", pa.binary()), ("path", pa.string())])

    def __init__(self, path: Path):
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.SCHEMA)
        self.rows: dict[str, int] = {}
        self.bytes = 0

    def add(self, id_: str, data: bytes, name: str) -> None:
        self._writer.write_table(pa.table({"bytes": [data], "path": [name]}, self.SCHEMA))
        self.rows[id_] = len(self.rows)
        self.bytes += len(data)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def images(self) -> pa.Table:
        """The spooled rows (bytes, path), memory-mapped."""
        self.close()
        return pa.ipc.open_file(pa.memory_map(str(self.path))).read_all()


class _ByRow(Mapping):
    """id -> one Arrow column's value at that id's row: a mapping without a Python object per row."""

    def __init__(self, rows: dict[str, int], column: pa.Array):
        self._rows, self._column = rows, column

    def __getitem__(self, id_: str) -> Any:
        return self._column[self._rows[id_]].as_py()

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def write_cleaned(folder: Path, source: Source, decided: pa.Table, score: str, settings: OutputSettings,
                 reconcile: Callable[[pa.Table, set[str]], pa.Table],
                 spool: ImageSpool | None = None) -> tuple[pa.Table, int]:
    """cleaned/ (the kept and augmented rows' images, in the datasets Image layout) and, with a
    `spool`, the flagged rows' original bytes, from one pass over the source that re-reads each
    input once (data.read_verified). Inputs whose bytes changed since scoring go to `reconcile`,
    which returns the decisions made consistent (remediate.reject_changed: those rows rejected,
    their clusters given new keepers); the rows it turns kept are read in another pass, until
    no input changes. Returns the decided table and the image bytes written to cleaned/."""
    cleaned, written, first = CleanedFiles(folder, settings), set(), True
    while True:
        todo = decided.select(list(dict.fromkeys(["id", "sha256", "action", "flagged", score, "log_volume_growth",
                                                  "augmented_png", "augmented_score", "augmented_volume_growth"])))
        todo = todo.filter(pc.and_(pc.invert(pc.is_in(todo.column("id"), pa.array(sorted(written), pa.string()))),
                                   _to_read(todo, spool is not None and first)))
        cols = {c: todo.column(c).combine_chunks() for c in todo.column_names}  # Arrow, read a row at a time
        rows = {id_: i for i, id_ in enumerate(cols["id"].to_pylist())}
        changed: set[str] = set()
        for item, data in read_verified(source, _ByRow(rows, cols["sha256"]), changed):
            i = rows[item.id]
            name, action = os.path.basename(item.path) or item.id, cols["action"][i].as_py()
            if first and spool is not None and cols["flagged"][i].as_py():
                spool.add(item.id, data, name)
            if action == "augmented":
                png = Path(cols["augmented_png"][i].as_py())
                cleaned.write({"bytes": png.read_bytes(), "path": os.path.splitext(name)[0] + ".aug.png"}, item.id,
                              cols["sha256"][i].as_py(), action, cols["augmented_volume_growth"][i].as_py(),
                              cols["augmented_score"][i].as_py(), score)
            elif action in KEPT:
                cleaned.write({"bytes": data, "path": name}, item.id, cols["sha256"][i].as_py(), action,
                              cols["log_volume_growth"][i].as_py(), cols[score][i].as_py(), score)
            if action in KEPT:
                written.add(item.id)
        first = False
        if not changed:
            break
        decided = reconcile(decided, changed)
    cleaned.close()
    return decided, cleaned.bytes


def _to_read(table: pa.Table, flagged: bool) -> pa.ChunkedArray:
    """Rows whose images a pass reads: kept and augmented ones, and flagged ones when spooling."""
    keep = pc.fill_null(pc.is_in(table.column("action"), pa.array(KEPT)), False)
    return pc.or_(keep, pc.fill_null(table.column("flagged"), False)) if flagged else keep


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


def write_flagged(folder: Path, spool: ImageSpool, decided: pa.Table, score: str, metadata: dict[str, Any],
                  row_group_rows: int = 256) -> int:
    """flagged.parquet: the flagged rows, highest score first, with `image` (the original file,
    from the spool that write_cleaned filled) and `augmented_image` (the accepted variant) in the
    datasets Image layout and the 'huggingface' metadata, so datasets.load_dataset('parquet')
    decodes both. Written in row groups of at most row_group_rows rows and about ROW_GROUP_BYTES
    of images. Returns the image bytes written; the spool's file is removed."""
    flagged = flagged_order(decided, score)
    ids = flagged.column("id").to_pylist()
    rows, total = spool.rows, spool.bytes
    pngs = flagged.column("augmented_png").to_pylist()
    schema = with_hf_features(pa.schema([("image", IMAGE), ("augmented_image", IMAGE)]
                                        + [f for f in flagged.schema if f.name != "augmented_png"]))
    per_group = max(1, min(row_group_rows, ROW_GROUP_BYTES * max(len(rows), 1) // max(total, 1)))
    images = spool.images()
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
    del images
    spool.path.unlink()
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


CATALOG = "dataset.json"  # a dataset's accepted parts, at its root (flows/drops.py writes it)


def against_outputs(against: str) -> list[str]:
    """The earlier outputs --against names: one output folder, several separated by commas, or a
    catalog (a dataset.json, or the dataset root that holds one: every part it has accepted)."""
    outputs = []
    for part in (p.strip() for p in str(against).split(",")):
        if not part:
            continue
        catalog = Path(part) / CATALOG if Path(part).is_dir() and not (Path(part) / "manifest.json").exists() \
            else Path(part)
        if catalog.name.endswith(".json") and catalog.is_file():
            outputs += [str(catalog.parent / p["out"]) for p in read_catalog(catalog)["parts"]]
        else:
            outputs.append(part)
    return outputs


def read_catalog(path: str | os.PathLike) -> dict[str, Any]:
    """A dataset's catalog: {"parts": [{"drop", "out", ...}], "data_files": ...}; a missing one is empty."""
    p = Path(path)
    if not p.exists():
        return {"parts": [], "data_files": []}
    try:
        catalog = json.loads(p.read_text())
        if not isinstance(catalog, dict) or not isinstance(catalog.get("parts"), list):
            raise ValueError("no parts list")
        return catalog
    except (OSError, ValueError) as e:
        raise ValueError(f"catalog {str(p)!r} is not a memclean dataset catalog: {e}") from e


def check_against(against: str, embedder_name: str) -> list[str]:
    """The earlier outputs --against names (against_outputs), resolved once and checked before
    any work: each must be a memclean output with embeddings from the same embedder. A run uses
    this list from then on (earlier_survivors, losses, the manifest), so that a catalog a
    concurrent drop grows mid-run cannot make its steps see different outputs."""
    outputs = against_outputs(against)
    for prev in map(Path, outputs):
        try:
            manifest = json.loads((prev / "manifest.json").read_text())
            pq.read_schema(prev / EMBEDDINGS)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ValueError(f"--against {str(prev)!r} is not a memclean output with embeddings: {e}") from e
        if manifest.get("dedup", {}).get("embedder") != embedder_name:
            raise ValueError(f"--against {str(prev)!r} was embedded with {manifest.get('dedup', {}).get('embedder')!r}, "
                             f"this run with {embedder_name!r}: they cannot be compared")
    return outputs


def earlier_survivors(outputs: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Names (`output:id`, the output as --against or the catalog names it) and embeddings of the
    kept and augmented images of the earlier outputs (check_against's list)."""
    if isinstance(outputs, str):
        raise TypeError("earlier_survivors takes check_against's list of outputs, not --against's text")
    names, parts = [], []
    for prev in outputs:
        table = pq.read_table(Path(prev) / EMBEDDINGS)
        kept = table.filter(pc.is_in(table.column("action"), pa.array(KEPT)))
        if not kept.num_rows:
            continue
        embedding = kept.column("embedding").combine_chunks()
        d = embedding.type.list_size
        parts.append(embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d))
        names += [f"{prev}:{i}" for i in kept.column("id").to_pylist()]
    if not parts:
        return [], np.zeros((0, 1), np.float32)
    return names, np.concatenate(parts)
