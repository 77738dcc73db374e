"""The `clean` flow: the `memclean clean` run as Prefect tasks, with sharded, mapped scoring.

Scoring is mapped over shards (task.map) on the task runner the `task_runner` parameter
chooses: a thread pool on one machine, or Dask (a LocalCluster, or an existing scheduler).
Scores are cached by image content, model fingerprint and scorer settings (pipeline/cache.py),
so a rerun on a grown dataset, or after a crash, scores only what is new.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.cache import default_cache_dir
from pipeline.clean import (CleanSettings, RunContext, ScoreJob, Stage, abort_run, finish_run, gather,
                            score_shard, scoring_summary, shard_items, shard_name, stage_name, start_run)
from pipeline.data import Item, discover
from pipeline.flagging import FlagSettings
from pipeline.remediate import RemediationSettings
from pipeline.volume import ScorerSettings


@task(cache_policy=NO_CACHE, retries=1)
def score_shard_task(job: ScoreJob, items: list[Item], name: str, embed: bool) -> dict[str, Any]:
    """Score one shard (cached scores are reused); writes staging/shards/name.*."""
    return score_shard(job, items, name, embed)


@flow(name="score-shards")
def score_shards(job: ScoreJob, shards: list[list[Item]], names: list[str], embed: bool) -> list[dict]:
    """Map scoring over shards; report progress as an artifact while they finish."""
    logger = get_run_logger()
    futures = score_shard_task.map(job, shards, names, embed)
    progress = create_progress_artifact(0.0, key="memclean-scoring", description="shards scored")
    done = []
    for f in as_completed(futures):
        done.append(f.result())
        update_progress_artifact(progress, 100.0 * len(done) / len(futures))
        logger.info("shard %s: %d rows, %d scored, %d reused", done[-1]["name"], done[-1]["rows"],
                    done[-1]["fresh"], done[-1]["reused"])
    return sorted(done, key=lambda r: r["name"])


def task_runner_for(kind: str, dask_address: str | None, dask_workers: int):
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=1)  # torch already uses every core per solve
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@task(cache_policy=NO_CACHE)
def start_task(**kwargs) -> RunContext:
    return start_run(**kwargs)


@task(cache_policy=NO_CACHE)
def finish_task(ctx: RunContext, scored, reference) -> dict[str, Any]:
    return finish_run(ctx, scored, reference)


def publish(manifest: dict[str, Any], out: str) -> None:
    """Artifacts: the top flagged images and a summary that links to the outputs."""
    import pyarrow.parquet as pq

    flagged = pq.read_table(Path(out) / "flagged.parquet").to_pylist()
    score = manifest["threshold"]["score"]
    top = sorted(flagged, key=lambda r: -r[score])[:50]
    create_table_artifact([{"id": r["id"], score: round(r[score], 3), "action": r["action"],
                            "dup_of": r["dup_of"], "why": r["action_reason"] or r["flag_reason"]} for r in top],
                          key="memclean-top-flagged", description="the highest-scoring flagged images")
    c, t = manifest["counts"], manifest["threshold"]
    report = Path(out).resolve() / "report.html"
    lines = [f"# memclean: {c['input']} inputs", "",
             "| kept | augmented | dropped | rejected | flagged |", "|---|---|---|---|---|",
             f"| {c['kept']} | {c['augmented']} | {c['dropped']} | {c['rejected']} | {c['flagged']} |", "",
             f"Threshold {t['value']:.6g} ({t['policy']}, {t['parameters']}), realised flag rate "
             f"{t['realised_flag_rate']:.3f}.", "",
             f"Scored {manifest['scoring']['scored_fresh']} images afresh, reused {manifest['scoring']['reused']}.", "",
             f"Outputs: `{Path(out).resolve()}`" + (f"; report: [report.html]({report.as_uri()})" if report.exists() else "")]
    create_markdown_artifact("\n".join(lines), key="memclean-summary", description="memclean clean run")


@flow(name="clean", log_prints=False)
def clean(data: str, model: str, out: str,
          reference: str | None = None, flag_fpr: float | None = None, flag_quantile: float | None = None,
          flag_zscore: float | None = None, flag_threshold: float | None = None,
          score: Literal["log_volume_growth", "logp"] = "log_volume_growth",
          embedder: str = "pixel", embed_size: int = 224, dup_threshold: float | None = None,
          dedup_flip: bool = False, against: str | None = None,
          action: Literal["auto", "dedup", "augment", "drop", "none"] = "auto", augment_tries: int = 3,
          on_failure: Literal["drop", "keep"] = "drop", augment_seed: int = 0, accept_band: float = 0.01,
          divergence: Literal["exact", "rademacher", "gaussian"] = "rademacher", probes: int = 1,
          probe_mode: Literal["fresh", "fixed"] | None = None,
          solver: Literal["heun", "euler", "rk4", "dopri5"] = "heun", steps: int = ScorerSettings.steps,
          rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5, seed: int = 0,
          grid: Literal["log_snr", "uniform"] = "log_snr", precision: Literal["fp32", "tf32", "bf16"] = "fp32",
          batch_size: int = 16, device: Literal["cpu", "cuda"] = "cpu", variant: str | None = None,
          data_range: Literal["auto", "signed", "unit"] = "auto", image_column: str | None = None,
          max_pixels: int = 89_478_485, min_size: int = 8, shard_size: int = 256,
          cache_dir: str | None = None, no_cache: bool = False, overwrite: bool = False,
          allow_pickle: bool = False, task_runner: Literal["threads", "dask"] = "threads",
          dask_address: str | None = None, dask_workers: int = 2) -> dict[str, Any]:
    """memclean clean as a flow: the parameters mean what `memclean clean`'s options mean."""
    logger = get_run_logger()
    scorer = ScorerSettings(divergence=divergence, probes=probes, probe_mode=probe_mode, solver=solver,
                            steps=steps, rtol=rtol, atol=atol, eps=eps, seed=seed, grid=grid,
                            precision=precision)
    settings = CleanSettings(
        flag=FlagSettings(flag_quantile, flag_fpr, flag_zscore, flag_threshold),
        remediation=RemediationSettings(action, augment_tries, on_failure, augment_seed, accept_band),
        score=score, reference=reference, embedder=embedder, embed_size=embed_size,
        dup_threshold=dup_threshold, dedup_flip=dedup_flip, against=against, batch_size=batch_size,
        device=device, variant=variant, data_range=data_range, image_column=image_column, max_pixels=max_pixels, min_size=min_size,
        shard_size=shard_size)
    cache = None if no_cache else (cache_dir or str(default_cache_dir()))
    ctx = start_task(data=data, model=model, out=out, scorer=scorer, settings=settings,
                     allow_pickle=allow_pickle, overwrite=overwrite, cache_dir=cache)
    try:
        runner = task_runner_for(task_runner, dask_address, dask_workers)
        scored_sets = {}
        for prefix, path, embed in (("input", data, True), ("reference", reference, False)):
            if path is None:
                continue
            shards = list(shard_items(discover(path, image_column), shard_size))
            names = [shard_name(prefix, k) for k in range(len(shards))]
            with Stage(ctx, stage_name(prefix)):
                results = score_shards.with_options(task_runner=runner)(ctx.job, shards, names, embed)
            scoring_summary(ctx, prefix, results)
            scored_sets[prefix] = gather(ctx.job, names)
        manifest = finish_task(ctx, scored_sets["input"], scored_sets.get("reference"))
    except BaseException:
        abort_run(ctx)
        raise
    publish(manifest, out)
    c = manifest["counts"]
    logger.info("%d inputs: %d kept, %d augmented, %d dropped, %d rejected -> %s",
                c["input"], c["kept"], c["augmented"], c["dropped"], c["rejected"], out)
    return manifest
