"""A content-addressed cache of scores, so a grown dataset scores only its new images.

A score depends on the image's bytes, the model and the scorer settings (and the input spec).
The cache keeps score columns under the sha256 of the file bytes, in a namespace named by the
hash of everything else; each scored batch adds one small Parquet file, written atomically, so
a run that dies keeps every batch it finished and a restarted run resumes from them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fields import setting

log = logging.getLogger(__name__)

# what a score is (the columns a cache entry keeps); complexity is not among them: it is the
# image's own code length, computed again from its pixels every time (pipeline/score/complexity.py)
SCORE_COLUMNS = ("log_volume_growth", "prior_logp", "logp", "bits_per_dim", "nfe", "log_volume_growth_se",
                 "window_volume_growth", "window_volume_growth_se", "denoising_loss", "denoising_loss_se")
CACHE_SCHEMA = pa.schema([("sha256", pa.string())] + [(c, pa.int64() if c == "nfe" else pa.float64())
                                                       for c in SCORE_COLUMNS])


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMCLEAN_CACHE", Path.home() / ".cache" / "memclean"))


@dataclass(frozen=True)
class CacheSettings:
    """Where scores are cached, and the unit of caching and resuming."""

    cache_dir: str | None = setting(None, "score cache, by image content + model fingerprint + scorer settings "
                                    "(memclean verify: its generations, by model fingerprint, steps and seed) "
                                    "(default $MEMCLEAN_CACHE or ~/.cache/memclean)")
    no_cache: bool = setting(False, "score everything afresh, cache nothing")
    shard_size: int = setting(256, "images per scoring shard: the unit of caching, resuming and mapping")

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.shard_size}")

    @property
    def root(self) -> str | None:
        """The cache folder this run uses, or None without a cache."""
        return None if self.no_cache else str(self.cache_dir or default_cache_dir())


def namespace(model_fingerprint: str, settings: dict[str, Any], spec: dict[str, Any]) -> str:
    """The hash of everything but the image that determines a score."""
    blob = json.dumps({"model": model_fingerprint, "settings": settings, "spec": spec}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


KEY = np.dtype("V32")  # a key's 32 raw bytes. Not "S32": numpy strips trailing NUL bytes from an S
# scalar, so a digest ending in 0x00 never equalled its own entry (1 image in 256 missed the
# cache on every run), and keys differing only in trailing NULs sorted as equal. V32 compares,
# sorts and searches all 32 bytes.


def _keys(raw: list[bytes]) -> np.ndarray:
    """Keys (32 bytes each) as a [n] KEY array."""
    return np.frombuffer(b"".join(raw), KEY) if raw else np.zeros(0, KEY)


def _key(sha256: str) -> bytes:
    """The 32 bytes a cache entry is kept under: the digest itself for a hex sha256, else the
    sha256 of the string (keys are opaque to the cache)."""
    try:
        if len(sha256) == 64:
            return bytes.fromhex(sha256)
    except ValueError:
        pass
    return hashlib.sha256(sha256.encode()).digest()


class ScoreCache:
    """Score columns by file sha256, for one (model, settings, spec) namespace. A process shares
    one instance per namespace (run.resources), and each refresh reads only new files.

    Entries live in two arrays sorted by key (32 raw bytes of digest, `KEY`, then the SCORE_COLUMNS as
    float64: 112 bytes an entry, against about 900 as Python dicts), looked up by binary search;
    entries added since the last fold wait in a small dict, folded in once they outnumber
    FOLD_AT or a quarter of the arrays (so folding costs O(log n) per entry).
    """

    FOLD_AT = 16384

    def __init__(self, root: str | os.PathLike, key: str):
        self.dir = Path(root) / key  # one folder per namespace
        self._keys = np.zeros(0, KEY)  # sorted, unique
        self._values = np.zeros((0, len(SCORE_COLUMNS)), np.float64)
        self._pending: dict[bytes, tuple[float, ...]] = {}
        self._read: set[str] = set()  # files already folded in
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys) + len(self._pending)

    def refresh(self) -> "ScoreCache":
        """Read the files added since the last refresh (by this or another process); start over
        if a file read before is gone (the cache was cleared)."""
        with self._lock:
            files = {f.name for f in self.dir.glob("*.parquet")} if self.dir.is_dir() else set()
            if not self._read <= files:
                self._keys, self._values, self._pending, self._read = self._keys[:0], self._values[:0], {}, set()
            keys, values = [], []
            for name in sorted(files - self._read):
                try:
                    table = pq.read_table(self.dir / name)
                    keys.append(_keys([_key(s) for s in table.column("sha256").to_pylist()]))
                    values.append(np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                            for c in SCORE_COLUMNS], axis=1))
                except (OSError, KeyError, pa.ArrowException) as e:  # a torn file from a killed writer
                    log.warning("ignoring unreadable cache file %s: %s", self.dir / name, e)
                self._read.add(name)
            if keys:
                self._fold(np.concatenate(keys), np.concatenate(values))
        return self

    def _fold(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Merge entries (and the pending ones) into the sorted arrays; a key already there keeps
        its first value (a score is a function of its key: later copies are equal or redundant)."""
        if self._pending:
            keys = np.concatenate([_keys(list(self._pending)), keys])
            values = np.concatenate([np.array(list(self._pending.values()), np.float64).reshape(-1, len(SCORE_COLUMNS)),
                                     values])
            self._pending = {}
        keys, first = np.unique(np.concatenate([self._keys, keys]), return_index=True)
        self._values = np.concatenate([self._values, values])[first]
        self._keys = keys

    def get(self, sha256: str) -> dict[str, Any] | None:
        k = _key(sha256)
        with self._lock:
            hit = self._pending.get(k)
            if hit is None:
                key = np.void(k)
                i = int(np.searchsorted(self._keys, key))
                if i == len(self._keys) or self._keys[i] != key:
                    return None
                hit = self._values[i]
        return {c: int(v) if c == "nfe" else float(v) for c, v in zip(SCORE_COLUMNS, hit)}

    def put(self, rows: list[dict[str, Any]]) -> None:
        """Add rows (sha256 + score columns) as one new file."""
        rows = [r for r in rows if self.get(r["sha256"]) is None]
        if not rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(sorted(r["sha256"] for r in rows)).encode()).hexdigest()[:24]
        path = self.dir / f"{name}.parquet"
        tmp = self.dir / f".{name}.tmp-{os.getpid()}-{threading.get_ident()}"  # a writer's own
        pq.write_table(pa.Table.from_pylist([{c: r[c] for c in CACHE_SCHEMA.names} for r in rows], CACHE_SCHEMA), tmp)
        os.replace(tmp, path)
        with self._lock:
            self._read.add(path.name)
            for r in rows:
                self._pending.setdefault(_key(r["sha256"]), tuple(float(r[c]) for c in SCORE_COLUMNS))
            if len(self._pending) > max(self.FOLD_AT, len(self._keys) // 4):
                self._fold(self._keys[:0], self._values[:0])
