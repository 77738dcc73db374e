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

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fields import setting

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("log_volume_growth", "prior_logp", "logp", "bits_per_dim", "nfe")  # what a score is
CACHE_SCHEMA = pa.schema([("sha256", pa.string())] + [(c, pa.int64() if c == "nfe" else pa.float64())
                                                       for c in SCORE_COLUMNS])


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMCLEAN_CACHE", Path.home() / ".cache" / "memclean"))


@dataclass(frozen=True)
class CacheSettings:
    """Where scores are cached, and the unit of caching and resuming."""

    cache_dir: str | None = setting(None, "score cache, by image content + model fingerprint + scorer settings "
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


class ScoreCache:
    """Score columns by file sha256, for one (model, settings, spec) namespace. A process shares
    one instance per namespace (run.resources), and each refresh reads only new files."""

    def __init__(self, root: str | os.PathLike, key: str):
        self.dir = Path(root) / key  # one folder per namespace
        self._known: dict[str, dict[str, Any]] = {}
        self._read: set[str] = set()  # files already in _known
        self._lock = threading.Lock()

    def refresh(self) -> "ScoreCache":
        """Read the files added since the last refresh (by this or another process); start over
        if a file read before is gone (the cache was cleared)."""
        with self._lock:
            files = {f.name for f in self.dir.glob("*.parquet")} if self.dir.is_dir() else set()
            if not self._read <= files:
                self._known, self._read = {}, set()
            for name in sorted(files - self._read):
                try:
                    for row in pq.read_table(self.dir / name).to_pylist():
                        self._known[row.pop("sha256")] = row
                except (OSError, pa.ArrowException) as e:  # a torn file from a killed writer
                    log.warning("ignoring unreadable cache file %s: %s", self.dir / name, e)
                self._read.add(name)
        return self

    def get(self, sha256: str) -> dict[str, Any] | None:
        return self._known.get(sha256)

    def put(self, rows: list[dict[str, Any]]) -> None:
        """Add rows (sha256 + score columns) as one new file."""
        rows = [r for r in rows if r["sha256"] not in self._known]
        if not rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(sorted(r["sha256"] for r in rows)).encode()).hexdigest()[:24]
        path = self.dir / f"{name}.parquet"
        tmp = self.dir / f".{name}.tmp-{os.getpid()}-{threading.get_ident()}"  # a writer's own
        pq.write_table(pa.Table.from_pylist([{c: r[c] for c in CACHE_SCHEMA.names} for r in rows], CACHE_SCHEMA), tmp)
        os.replace(tmp, path)
        self._read.add(path.name)
        for r in rows:
            self._known[r["sha256"]] = {c: r[c] for c in SCORE_COLUMNS}


