"""Parquet outputs: the score table's schema and writers that never leave a partial file.

A writer streams row groups into a hidden temporary file beside the target and renames it
into place only when the caller commits; an exception removes the temporary file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.fields import setting

log = logging.getLogger(__name__)

METADATA_KEY = b"memclean"  # Parquet schema metadata: JSON of settings, model, versions
RUN_KEY = b"memclean_run"  # Parquet footer metadata, added at commit: JSON of what is known only then

SCORE_SCHEMA = pa.schema([
    ("id", pa.string()),  # stable id within the source (relative path for folders)
    ("path", pa.string()),  # where the image came from
    ("sha256", pa.string()),  # of the file bytes; null if unreadable
    ("pixel_sha256", pa.string()),  # of the decoded pixels (exact duplicates in any format)
    ("path_bytes", pa.binary()),  # the exact file-system path (lossless for non-UTF-8 names)
    ("sidecar", pa.string()),  # WebDataset: the sample's small .json / .txt members, a JSON object {ext: text}
    ("width", pa.int64()),  # of the original image, after EXIF orientation
    ("height", pa.int64()),  # of the original image, after EXIF orientation
    ("status", pa.string()),  # ok | rejected
    ("reject_reason", pa.string()),  # null when ok
    ("log_volume_growth", pa.float64()),  # V(x) = integral_eps^1 div f dt (nats)
    ("prior_logp", pa.float64()),  # log p_1(x_1)
    ("logp", pa.float64()),  # prior_logp + log_volume_growth (nats)
    ("bits_per_dim", pa.float64()),  # -logp / (D ln 2) + log2(255 / (hi - lo)), the data range's bins
    ("nfe", pa.int64()),  # drift evaluations spent on this image (over every pass)
    ("passes", pa.int64()),  # scoring passes averaged (--precision-target): seeds seed .. seed + passes - 1; null: rejected
    ("log_volume_growth_se", pa.float64()),  # standard error of V from its probes (null: not estimable)
    ("window_volume_growth", pa.float64()),  # V over [window_start, 1], from the same solve (nats)
    ("window_volume_growth_se", pa.float64()),  # its standard error
    ("denoising_loss", pa.float64()),  # mean ||eps_hat - eps||^2 / D at loss_t over loss_noises noises
    ("denoising_loss_se", pa.float64()),  # its standard error (sd of the per-noise losses / sqrt(n))
    ("complexity", pa.float64()),  # lossless WebP code length of the image as the model sees it (nats)
    ("reused", pa.bool_()),  # the score came from the cache of an earlier run (not solved again)
    ("divergence", pa.string()),  # the settings that produced the score ...
    ("probes", pa.int64()),
    ("probe_mode", pa.string()),  # fresh (new probes at every drift evaluation) | fixed
    ("solver", pa.string()),
    ("steps", pa.int64()),
    ("rtol", pa.float64()),
    ("atol", pa.float64()),
    ("eps", pa.float64()),
    ("seed", pa.int64()),
    ("grid", pa.string()),  # fixed-grid times: log_snr or uniform (dopri5 ignores it)
    ("precision", pa.string()),  # the network's arithmetic: fp32 | tf32 | bf16
    ("window_start", pa.float64()),  # the window's requested start (the first grid time at or after it)
    ("loss_t", pa.float64()),  # the denoising loss's time
    ("loss_noises", pa.int64()),  # its noises
    ("complexity_codec", pa.string()),  # the coder and versions behind complexity
    ("data_range", pa.string()),  # the range the image was scored in: [-1, 1] (VP) or [0, 1] (VE)
    ("score_space", pa.string()),  # pixel, or latent: the score is of the latent a latent pipeline's UNet diffuses
    ("latent_shape", pa.string()),  # C x H x W of that latent (latent pipelines only)
    ("model_fingerprint", pa.string()),  # sha256 of the weights and configs that scored it
])

JUDGED_SCHEMA = pa.schema([  # the scores computed at decision time (decide/scores.py), higher = riskier
    ("calibrated_volume_growth", pa.float64()),  # V less its fitted trend on complexity
    ("calibrated_volume_growth_se", pa.float64()),
    ("denoising_score", pa.float64()),  # -log denoising_loss
    ("denoising_score_se", pa.float64()),
    ("calibrated_denoising_score", pa.float64()),  # -log denoising_loss less its fitted trend on complexity
    ("calibrated_denoising_score_se", pa.float64()),
    ("combined_score", pa.float64()),  # (z(calibrated V) + z(calibrated denoising score)) / sqrt 2
    ("combined_score_se", pa.float64()),
])

DECISION_SCHEMA = pa.schema(list(JUDGED_SCHEMA) + [
    ("flagged", pa.bool_()),  # score above the threshold (null when rejected)
    ("flag_uncertain", pa.bool_()),  # the judged score lies within 2 standard errors of the threshold
    ("flag_reason", pa.string()),  # policy, threshold and score, for people
    ("dup_cluster", pa.int64()),  # duplicate cluster number; null for images with no duplicate
    ("dup_of", pa.string()),  # the id this row duplicates (its cluster's keeper, or an earlier output's)
    ("dup_similarity", pa.float32()),  # its highest similarity to another member
    ("action", pa.string()),  # kept | augmented | dropped | rejected
    ("action_reason", pa.string()),  # why, for people
    ("augment_preset", pa.string()),  # light | medium | strong: the last augmentation tried
    ("augment_tries", pa.int64()),  # augmentations tried
    ("augmented_score", pa.float64()),  # the judged re-score of the last augmentation
    ("augmented_volume_growth", pa.float64()),  # its V (log_volume_growth), whatever is judged
    ("augmentation", pa.string()),  # JSON: preset, seed, serialised transform, drawn parameters
    ("augmented_png", pa.string()),  # internal: staging path of the accepted augmentation
])

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face datasets' Image layout

CLEANED_SCHEMA = pa.schema([
    ("image", IMAGE),  # datasets Image
    ("id", pa.string()),  # the input's id in scores.parquet
    ("sha256", pa.string()),  # of the source file
    ("action", pa.string()),  # kept | augmented
    ("log_volume_growth", pa.float64()),  # V of the image written (an augmented row's: its variant's)
    ("judged_score", pa.float64()),  # the score flagging judged, of the image written
    ("judged_by", pa.string()),  # which score that is (--score)
])
HF_DTYPES = {pa.string(): "string", pa.float64(): "float64", pa.float32(): "float32", pa.int64(): "int64",
             pa.bool_(): "bool", pa.binary(): "binary", pa.null(): "null"}
COMPLETE_MARKER = "_COMPLETE"  # written last into a finished output folder


@dataclass(frozen=True)
class OutputSettings:
    """Where the outputs go and how the cleaned dataset is split."""

    out: str = setting(help="where the outputs go: a .parquet file (memclean score), a folder (memclean clean and "
                       "dedup) or a checkpoint folder (memclean train)")
    overwrite: bool = setting(False, "replace an existing output")
    shard_rows: int = setting(10_000, "rows per cleaned/ Parquet file", cli=False)
    row_group_rows: int = setting(256, "rows per row group in cleaned/", cli=False)

    def __post_init__(self) -> None:
        if min(self.shard_rows, self.row_group_rows) < 1:
            raise ValueError("shard_rows and row_group_rows must be at least 1")


def ok_mask(table: pa.Table) -> np.ndarray:
    """Which rows of a score table decoded and were scored: [rows] bool."""
    return pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False).astype(bool)


def score_values(table: pa.Table, name: str) -> np.ndarray:
    """A score column as float64, NaN where null: [rows]."""
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def with_metadata(schema: pa.Schema, metadata: dict[str, Any]) -> pa.Schema:
    """`schema` with `metadata` stored as JSON under the memclean key (other keys kept)."""
    merged = dict(schema.metadata or {})
    merged[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str).encode()
    return schema.with_metadata(merged)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The memclean metadata of a Parquet file written here: its schema's, with the footer's
    RUN_KEY record (a staged run's timings and memory, added at commit) merged in."""
    raw = pq.read_schema(path).metadata or {}
    meta = json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else {}
    footer = pq.ParquetFile(path).metadata.metadata or {}
    return {**meta, **json.loads(footer[RUN_KEY])} if RUN_KEY in footer else meta


def with_hf_features(schema: pa.Schema) -> pa.Schema:
    """`schema` with the 'huggingface' metadata that `datasets` reads: every IMAGE column is an
    Image feature (decoded to PIL on access), every other column a Value of its type."""
    features = {f.name: {"_type": "Image"} if f.type == IMAGE else {"dtype": HF_DTYPES[f.type], "_type": "Value"}
                for f in schema}
    meta = dict(schema.metadata or {})
    meta[b"huggingface"] = json.dumps({"info": {"features": features}}).encode()
    return schema.with_metadata(meta)


def cleaned_schema() -> pa.Schema:
    """CLEANED_SCHEMA with the Hugging Face features metadata that `datasets` reads."""
    return with_hf_features(CLEANED_SCHEMA)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file whole: to a hidden temporary file beside it, then renamed into place."""
    path = Path(path)
    tmp = _temporary(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def is_complete(out: str | os.PathLike) -> bool:
    return (Path(out) / COMPLETE_MARKER).is_file()


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write into an existing output folder unless `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite:
        state = "a complete memclean output" if is_complete(out) else "not a complete memclean output"
        raise FileExistsError(f"{out} exists ({state}); pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Delete staging folders left beside `out` by runs whose process is gone (killed runs)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("removing %s, left by a run that died", p)
            shutil.rmtree(p, ignore_errors=True)


class OutputLock:
    """An exclusive lock on an output path (flock on a hidden file beside it), held for a run:
    a second run on the same --out fails at once instead of interleaving with the first. The
    kernel releases it when the process ends, however it ends; a clean release also removes
    the file (a killed run's file is harmless: the next run locks and removes it)."""

    def __init__(self, out: str | os.PathLike):
        out = Path(out)
        self.path = out.with_name(f".{out.name}.lock")
        writable(out.parent)
        for _ in range(5):  # the file may be removed by the run releasing it as we open it
            self._fd = self._try_lock(out)
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, str(os.getpid()).encode(), 0)
                return
        raise FileExistsError(f"another memclean run is writing {out}; wait for it, or choose another --out")

    def _try_lock(self, out: Path) -> int | None:
        """A locked fd on the file now at self.path, None if it went away meanwhile."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"another memclean run (pid {holder}) is writing {out}; wait for it, "
                                  "or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still held: no other run can have locked this file
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def writable(folder: Path) -> None:
    """Make `folder` (and its parents) or say clearly why an output cannot go there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the output's folder {str(folder)!r}: {e.strerror}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"the output's folder {str(folder)!r} is not writable")


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh hidden folder beside `out` where a run builds its outputs."""
    out = Path(out)
    writable(out.parent)
    remove_stale_staging(out)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def commit_dir(staging: Path, out: str | os.PathLike, overwrite: bool) -> Path:
    """Mark `staging` complete and move it to `out` (replacing it only if `overwrite`)."""
    out = Path(out)
    (staging / COMPLETE_MARKER).write_text("")
    old = None
    if out.exists():
        check_output_dir(out, overwrite)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


class AtomicParquetWriter:
    """Stream rows to `path`, which appears only on `commit()` (or a clean `with` exit)."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, metadata: dict[str, Any],
                 row_group_size: int = 1024, use_dictionary: bool | list[str] = True):
        self.path = Path(path)
        self.schema = with_metadata(schema, metadata)
        self.row_group_size = row_group_size  # rows buffered before a row group is written
        self._tmp = _temporary(self.path)
        self._rows: list[dict[str, Any]] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # use_dictionary: the columns worth a dictionary (not float vectors: their dictionary
        # is as large as the data, and building it doubled write_embeddings' memory and time)
        self._writer = pq.ParquetWriter(self._tmp, self.schema, use_dictionary=use_dictionary)
        self.count = 0  # rows written so far

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._rows.append(row)
            self.count += 1
            if len(self._rows) >= self.row_group_size:
                self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Write a whole table (after any buffered rows), in row groups of row_group_size."""
        self._flush()
        self._writer.write_table(table.cast(self.schema), row_group_size=self.row_group_size)
        self.count += table.num_rows

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def commit(self, footer: dict[str, Any] | None = None) -> Path:
        """Close and move the file into place; `footer`: metadata known only now (RUN_KEY)."""
        self._flush()
        if footer:
            self._writer.add_key_value_metadata({RUN_KEY: json.dumps(footer, sort_keys=True, default=str)})
        self._writer.close()
        os.replace(self._tmp, self.path)
        log.info("wrote %d rows to %s", self.count, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
