"""`memclean score` as a library call: every image of a source scored into one Parquet file,
one row per input (ok or rejected), written as a staged run (run/staged.py): locked, timed, and
moved into place whole; the run's timings and memory are in the file's metadata.

It spends precision as `memclean clean` does (run/passes.py): a pass, then another with the next
seed averaged in while the judged score's noise ratio is above --precision-target (at most
--max-passes). Each pass is written to the staging folder first; rows record their `passes` and
the file's metadata `precision` the passes and the ratio after each."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.io.data import discover
from pipeline.io.store import SCORE_SCHEMA, AtomicParquetWriter, ok_mask
from pipeline.run.passes import precision_record, spend
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

        def one_pass(k: int) -> dict[str, pa.Table]:
            """Pass k (seed + k) into the staging folder, read back whole (score rows are small)."""
            path = run.staging / f"pass{k + 1}.parquet"
            with run.stage("score" if k == 0 else f"score_pass{k + 1}"):
                with AtomicParquetWriter(path, SCORE_SCHEMA, {}) as writer:
                    for rows in score_items(model, source, replace(settings.scorer, seed=settings.scorer.seed + k),
                                            spec, settings.model.batch_size, settings.model.device, progress):
                        writer.write(rows)
            return {"input": pq.read_table(path)}

        ratios: list[float | None] = []
        table = spend(settings.judge, one_pass(0), one_pass, ratios)["input"]
        metadata: dict[str, Any] = {"settings": settings.flat(), "memclean_version": __version__,
                                    "model": model.record(), "precision": precision_record(settings.judge, ratios)}
        writer = AtomicParquetWriter(run.target, SCORE_SCHEMA, metadata)
        try:
            writer.write_table(table)
            writer.commit(footer=run.record())
        except BaseException:
            writer.abort()
            raise
        run.commit()
        return table.num_rows, table.num_rows - int(ok_mask(table).sum())


def count_inputs(data: str, image_column: str | None) -> int:
    """How many inputs a source holds, without decoding any (for a progress bar)."""
    return discover(data, image_column).count()
