"""`memclean score` as a library call: every image of a source scored into one Parquet file,
one row per input (ok or rejected), written as a staged run (run/staged.py): locked, timed, and
moved into place whole; the run's timings and memory are in the file's metadata."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from pipeline import __version__
from pipeline.io.data import discover
from pipeline.io.store import SCORE_SCHEMA, AtomicParquetWriter
from pipeline.run.resources import resources
from pipeline.run.settings import ScoreSettings
from pipeline.run.staged import StagedRun
from pipeline.score.ready import ready, resolved_scorer
from pipeline.score.scoring import image_spec, score_items


def score_to_parquet(settings: ScoreSettings, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Score settings.input into settings.output.out; returns (rows, rejected rows)."""
    with StagedRun(settings.output.out, settings.output.overwrite, file=True) as run:
        model = resources().model(settings.model)  # first: a wrong --model fails before any input is counted
        source = discover(settings.input.data, settings.input.image_column)
        spec = image_spec(model, settings.input.max_pixels, settings.input.min_size)
        with run.stage("compile"):  # the batch size resolved, the network compiled (score/ready.py)
            scorer = resolved_scorer(settings.scorer, settings.model)
            settings = replace(settings, model=ready(model, settings.model, scorer), scorer=scorer)
        metadata = {"settings": settings.flat(), "memclean_version": __version__, "model": model.record()}
        rejected = 0
        writer = AtomicParquetWriter(run.target, SCORE_SCHEMA, metadata)
        try:
            with run.stage("score"):
                for rows in score_items(model, source, settings.scorer, spec, settings.model.batch_size,
                                        settings.model.device, progress):
                    writer.write(rows)
                    rejected += sum(r["status"] == "rejected" for r in rows)
            writer.commit(footer=run.record())
        except BaseException:
            writer.abort()
            raise
        run.commit()
        return writer.count, rejected


def count_inputs(data: str, image_column: str | None) -> int:
    """How many inputs a source holds, without decoding any (for a progress bar)."""
    return discover(data, image_column).count()
