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
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

CACHED_COLUMNS = ("log_volume_growth", "prior_logp", "logp", "bits_per_dim", "nfe")
CACHE_SCHEMA = pa.schema([("sha256", pa.string()), ("log_volume_growth", pa.float64()),
                          ("prior_logp", pa.float64()), ("logp", pa.float64()),
                          ("bits_per_dim", pa.float64()), ("nfe", pa.int64())])


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMCLEAN_CACHE", Path.home() / ".cache" / "memclean"))


def namespace(model_fingerprint: str, settings: dict[str, Any], spec: dict[str, Any]) -> str:
    """The hash of everything but the image that determines a score."""
    blob = json.dumps({"model": model_fingerprint, "settings": settings, "spec": spec}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class ScoreCache:
    """Score columns by file sha256, for one (model, settings, spec) namespace."""

    def __init__(self, root: str | os.PathLike, key: str):
        self.dir = Path(root) / key  # one folder per namespace
        self._known: dict[str, dict[str, Any]] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._known is None:
            self._known = {}
            for f in sorted(self.dir.glob("*.parquet")) if self.dir.is_dir() else []:
                try:
                    for row in pq.read_table(f).to_pylist():
                        self._known[row.pop("sha256")] = row
                except (OSError, pa.ArrowException) as e:  # a torn file from a killed writer
                    log.warning("ignoring unreadable cache file %s: %s", f, e)
        return self._known

    def get(self, sha256: str) -> dict[str, Any] | None:
        return self._load().get(sha256)

    def put(self, rows: list[dict[str, Any]]) -> None:
        """Add rows (sha256 + score columns) as one new file."""
        rows = [r for r in rows if r["sha256"] not in self._load()]
        if not rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(sorted(r["sha256"] for r in rows)).encode()).hexdigest()[:24]
        path = self.dir / f"{name}.parquet"
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        pq.write_table(pa.Table.from_pylist([{c: r[c] for c in CACHE_SCHEMA.names} for r in rows], CACHE_SCHEMA), tmp)
        os.replace(tmp, path)
        for r in rows:
            self._known[r["sha256"]] = {c: r[c] for c in CACHED_COLUMNS}
