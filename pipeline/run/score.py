"""`memclean score` as a library call: every image of a source scored into one Parquet file,
one row per input (ok or rejected), written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline import __version__
from pipeline.io.data import discover
from pipeline.io.store import SCORE_SCHEMA, AtomicParquetWriter, OutputLock
from pipeline.run.resources import resources
from pipeline.run.settings import ScoreSettings
from pipeline.score.scoring import image_spec, score_items


def score_to_parquet(settings: ScoreSettings, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Score settings.input into settings.output.out; returns (rows, rejected rows)."""
    out = Path(settings.output.out)
    lock = OutputLock(out)
    try:
        return _score(settings, out, progress)
    finally:
        lock.release()


def _score(settings: ScoreSettings, out: Path, progress: Callable[[int], None] | None) -> tuple[int, int]:
    if out.exists() and not settings.output.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    source = discover(settings.input.data, settings.input.image_column)
    model = resources().model(settings.model)
    spec = image_spec(model, settings.input.max_pixels, settings.input.min_size)
    metadata = {"settings": settings.flat(), "memclean_version": __version__, "model": model.record()}
    rejected = 0
    with AtomicParquetWriter(out, SCORE_SCHEMA, metadata) as writer:
        for rows in score_items(model, source, settings.scorer, spec, settings.model.batch_size,
                                settings.model.device, progress):
            writer.write(rows)
            rejected += sum(r["status"] == "rejected" for r in rows)
    return writer.count, rejected


def count_inputs(data: str, image_column: str | None) -> int:
    """How many inputs a source holds, without decoding any (for a progress bar)."""
    return discover(data, image_column).count()
