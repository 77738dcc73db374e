"""A staged run: how every verb writes its output. The output is built in a hidden folder beside
OUT, stage by stage (each timed, with the memory it leaves held), and moved into place whole; on
any error, or without a commit, the folder is removed and OUT is as it was.

    with StagedRun(out, overwrite) as run:   # OUT locked, an existing one refused, a staging folder made
        with run.stage("score"):             # seconds, peak RSS and anonymous memory held after it
            ...                              # write into run.staging (or run.target for a file output)
        run.commit()                         # OUT appears whole: the folder, or the one file
    # leaving the block: the lock released; an uncommitted staging folder removed

`record()` is the timings and memory every verb's manifest (or a score file's metadata) carries,
under the same keys: timings_s, peak_rss_mb, held_mb.
"""
from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.io.store import OutputLock, check_output_dir, commit_dir, staging_dir
from pipeline.run.resources import held_mb, trim_heap

log = logging.getLogger(__name__)


class StagedRun:
    """One run's output: lock, staging folder, stage records, commit or abort."""

    def __init__(self, out: str | os.PathLike, overwrite: bool, file: bool = False):
        self.out = Path(out)  # the output: a folder, or one file when `file`
        self.overwrite = overwrite  # an existing OUT may be replaced
        self.file = file  # OUT is one file (memclean score), written as `target` inside the staging folder
        self.timings: dict[str, float] = {}  # seconds per stage
        self.peak_rss_mb: dict[str, float] = {}  # process peak RSS after each stage
        self.held_mb: dict[str, float] = {}  # anonymous memory held after each stage, freed memory returned
        self.staging: Path | None = None
        self.lock: OutputLock | None = None
        self.committed = False

    def open(self) -> "StagedRun":
        """Lock OUT, refuse an existing one (unless overwrite), make the staging folder."""
        self.lock = OutputLock(self.out)
        try:
            check_output(self.out, self.overwrite, self.file)
            self.staging = staging_dir(self.out)
        except BaseException:
            self.release()
            raise
        return self

    @property
    def target(self) -> Path:
        """Where a file output is written before its commit."""
        assert self.staging is not None, "the run is not open"
        return self.staging / self.out.name

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage and record the memory after it (freed pages returned first)."""
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)
            trim_heap()  # what the stage freed leaves the process, not only its heap
            held = held_mb()
            if held is not None:
                self.held_mb[name] = held
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            self.peak_rss_mb[name] = round(peak, 1)
            log.info("stage %s: %.1f s, peak RSS so far %.0f MB, held after it %s MB", name, self.timings[name],
                     peak, held)

    def record(self) -> dict[str, dict[str, float]]:
        """The stages' timings and memory, as every verb's manifest keeps them."""
        return {"timings_s": dict(self.timings), "peak_rss_mb": dict(self.peak_rss_mb), "held_mb": dict(self.held_mb)}

    def commit(self) -> Path:
        """Move the finished output into place (a folder gets _COMPLETE first) and release OUT."""
        assert self.staging is not None and not self.committed, "commit needs an open, uncommitted run"
        if self.file:
            check_output(self.out, self.overwrite, True)
            os.replace(self.target, self.out)
            shutil.rmtree(self.staging, ignore_errors=True)
        else:
            commit_dir(self.staging, self.out, self.overwrite)
        self.committed = True
        self.release()
        return self.out

    def set_aside(self, path: Path) -> Path:
        """Move the unfinished output to `path` (replacing what is there; no _COMPLETE marker)
        for a user to read, leave OUT as it was, and release it: a plan, not an output."""
        assert self.staging is not None and not self.committed, "set_aside needs an open, uncommitted run"
        if path.exists():
            shutil.rmtree(path)
        os.replace(self.staging, path)
        self.staging = None
        self.release()
        return path

    def abort(self) -> None:
        """Remove the staging folder and release OUT: nothing of the run remains."""
        if self.staging is not None and not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "StagedRun":
        return self if self.staging is not None else self.open()

    def __exit__(self, *exc: Any) -> None:
        self.abort()


def check_output(out: Path, overwrite: bool, file: bool) -> None:
    """Refuse an existing output unless `overwrite`; a file output may not replace a folder."""
    if not file:
        check_output_dir(out, overwrite)
    elif out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    elif out.is_dir():
        raise FileExistsError(f"{out} is a folder: memclean score writes one .parquet file")
