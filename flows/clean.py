"""The `clean` flow: the `memclean clean` run as Prefect tasks, with sharded, mapped scoring.

Its parameters are derived from the settings model (pipeline/run/settings.py): the same flat
names as `memclean clean`'s options (`flag_fpr`, `dup_threshold`, ...) plus where to map the
shards (FlowSettings). Scoring is mapped over shards (task.map) on a thread pool or Dask; scores
are cached by image content, model fingerprint and scorer settings, so a rerun on a grown
dataset, or after a crash, scores only what is new. Each task is a few lines of library calls.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.fields import options, signature
from pipeline.io.data import Shard
from pipeline.io.report import REPORT_COLUMNS, read_report_rows, shown_rows
from pipeline.run.gpus import GPU_ENV, pinned, worker_gpus
from pipeline.run.lifecycle import RunContext, finish_run, score_sources, start_run
from pipeline.run.settings import FlowSettings, RunSettings
from pipeline.run.shards import ScoreJob, score_shard, shard_name, shard_threads

PARAMETERS = options(RunSettings) + options(FlowSettings)  # the flow's parameters, in order


@task(cache_policy=NO_CACHE, retries=1)
def score_shard_task(job: ScoreJob, shard: Shard, name: str, embed: bool) -> dict[str, Any]:
    """Score one shard (cached scores are reused); writes staging/shards/name.*. The shard is a
    descriptor: the task opens its items itself."""
    threads = os.environ.get("MEMCLEAN_TORCH_THREADS")  # a Dask worker's share of the cores
    if threads and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
    return score_shard(pinned(job, os.environ), shard, name, embed)


@flow(name="score-shards")
def score_shards(job: ScoreJob, shards: list[Shard], names: list[str], embed: bool) -> list[dict]:
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


def task_runner_for(s: FlowSettings, device: str = "cpu"):
    """Threads (one shard at a time on the CPU, where each solve uses every core; two on CUDA, so
    that shard boundaries overlap the network: run/shards.py); one Dask worker per GPU where
    the run's device is cuda and several are visible or `devices` names them (run/gpus.py); or
    Dask: each LocalCluster worker gets cores / workers torch threads, so workers do not fight
    over the cores."""
    gpus = [] if s.dask_address else worker_gpus(s.devices, device, visible_gpus())
    if s.task_runner == "threads" and not gpus:
        return ThreadPoolTaskRunner(max_workers=shard_threads(device))
    from prefect_dask import DaskTaskRunner

    if s.dask_address:
        return DaskTaskRunner(address=s.dask_address)
    import dask

    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in each worker it spawns. Any explicit value
    # turns off glibc's dynamic mmap threshold: every tensor above 128 KB is then a fresh mmap
    # whose pages fault in, and a shard scored 1.6x slower in a worker than in this process
    # (5.2 s against 3.3 s for 64 demo digits, measured 2026-11-29). Unset it for the workers this
    # process starts (benchmarks/workers.py measures the aggregate).
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    env = core_share(len(gpus) or s.dask_workers)
    api = api_url()
    if api:  # else each worker process would start an ephemeral Prefect server of its own
        env["PREFECT_API_URL"] = api
    if gpus:
        return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=gpu_cluster(gpus, env))
    return DaskTaskRunner(cluster_kwargs={"n_workers": s.dask_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "env": env})


def core_share(workers: int) -> dict[str, str]:
    """The environment that gives each of `workers` worker processes cores / workers threads."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "MEMCLEAN_TORCH_THREADS": threads}


def visible_gpus() -> int:
    """How many CUDA devices this torch sees (0 on a CPU build)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_cluster(gpus: list[int], env: dict[str, str]) -> dict[str, Any]:
    """SpecCluster arguments for one worker process per GPU, each seeing only its own
    (CUDA_VISIBLE_DEVICES) and told so (GPU_ENV), with two threads so that it scores two shards at
    once (run/shards.py: their networks take turns); `env` shares the cores out among them."""
    from distributed import Nanny, Scheduler

    workers = {f"gpu{g}": {"cls": Nanny, "options": {"nthreads": shard_threads("cuda"), "env": {
        **env, "CUDA_VISIBLE_DEVICES": str(g), GPU_ENV: f"cuda:{g}"}}} for g in gpus}
    return {"workers": workers, "scheduler": {"cls": Scheduler, "options": {"dashboard_address": None}}}


def api_url() -> str | None:
    """The Prefect API this process reports to: PREFECT_API_URL, or the ephemeral server it
    started (Prefect keeps it as SubprocessASGIServer's instance for no port)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    try:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer._instances.get(None)
        return server.api_url if server is not None and server.running else None
    except (ImportError, AttributeError):
        return None


def mapped(runner):
    """A ShardScorer (lifecycle.score_sources) that maps the shards over Prefect tasks on `runner`."""
    def score(job: ScoreJob, prefix: str, shards, embed: bool) -> list[dict[str, Any]]:
        shards = list(shards)
        names = [shard_name(prefix, k) for k in range(len(shards))]
        return score_shards.with_options(task_runner=runner)(job, shards, names, embed)
    return score


@task(cache_policy=NO_CACHE)
def start_task(settings: RunSettings) -> RunContext:
    return start_run(settings)


@task(cache_policy=NO_CACHE)
def finish_task(ctx: RunContext, scored) -> dict[str, Any]:
    return finish_run(ctx, scored)


def publish(manifest: dict[str, Any], out: str) -> None:
    """Artifacts: the top flagged images (a duplicate cluster once, as the report shows them)
    and a summary that links to the outputs."""
    score = manifest["threshold"]["score"]
    top, _, _ = shown_rows(read_report_rows(Path(out) / "scores.parquet", REPORT_COLUMNS + [score]), score)
    create_table_artifact([{"id": r["id"], score: round(r[score], 3), "action": r["action"], "dup_of": r["dup_of"],
                            "why": r["action_reason"] or r["flag_reason"]} for r in top[:50]],
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


def settings_of(params: dict[str, Any]) -> tuple[RunSettings, FlowSettings]:
    """The run's settings and where its tasks run, built (and so validated) from flat parameters."""
    flow_params = {o.name for o in options(FlowSettings)}
    return (RunSettings.from_flat({k: v for k, v in params.items() if k not in flow_params}),
            FlowSettings.from_flat({k: v for k, v in params.items() if k in flow_params}))


def clean(**params: Any) -> dict[str, Any]:
    """memclean clean as a flow: the parameters mean what `memclean clean`'s options mean."""
    logger = get_run_logger()
    settings, where = settings_of(params)
    runner = task_runner_for(where, settings.model.device)
    with start_task(settings) as ctx:  # the same three steps as lifecycle.run_clean
        manifest = finish_task(ctx, score_sources(ctx, mapped(runner)))
    publish(manifest, settings.output.out)
    c = manifest["counts"]
    logger.info("%d inputs: %d kept, %d augmented, %d dropped, %d rejected -> %s",
                c["input"], c["kept"], c["augmented"], c["dropped"], c["rejected"], settings.output.out)
    return manifest


clean.__signature__ = signature(PARAMETERS)
clean.__annotations__ = {p.name: p.annotation for p in clean.__signature__.parameters.values()}
clean = flow(name="clean", log_prints=False)(clean)
