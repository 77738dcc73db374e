"""run/gpus.py and the flow's one worker per GPU: the device assignment with CUDA stubbed away,
and a real two-worker cluster built from the same specification (on the CPU)."""
import os

import pytest

from pipeline.run.gpus import GPU_ENV, parse_devices, pinned, worker_gpus
from pipeline.run.settings import FlowSettings


@pytest.mark.parametrize("devices,device,visible,expected", [
    (None, "cuda", 1, []),  # one GPU: one worker, as before
    (None, "cuda", 4, [0, 1, 2, 3]),  # several: one worker each
    (None, "cuda:1", 4, []),  # the user named one device
    (None, "cpu", 4, []),
    ("cuda:1,cuda:3", "cuda", 4, [1, 3]),
    ("cuda:0", "cuda", 1, [0]),
])
def test_worker_gpus(devices, device, visible, expected):
    assert worker_gpus(devices, device, visible) == expected


@pytest.mark.parametrize("devices,device,visible,error", [
    ("cuda:4", "cuda", 4, "sees 4 CUDA device"),
    ("cuda:0", "cpu", 2, "--device is 'cpu'"),
    ("cuda:0,cuda:0", "cuda", 2, "twice"),
    ("cuda", "cuda", 2, "index"),
    ("gpu0", "cuda", 2, "not a device"),
])
def test_worker_gpus_refuses(devices, device, visible, error):
    with pytest.raises(ValueError, match=error):
        worker_gpus(devices, device, visible)


def test_devices_are_checked_with_the_flow_s_settings():
    assert parse_devices("cuda:0, cuda:2") == [0, 2]
    with pytest.raises(ValueError, match="not a device"):
        FlowSettings(devices="cuda:x")


def test_a_pinned_worker_scores_on_its_one_device():
    from pipeline.run.settings import RunSettings
    from pipeline.run.shards import ScoreJob

    job = ScoreJob(RunSettings.from_flat({"data": "d", "model": "m", "out": "o", "device": "cuda:3"}), "s")
    assert pinned(job, {}) is job
    assert pinned(job, {GPU_ENV: "cuda:3"}).settings.model.device == "cuda"


@pytest.fixture
def two_gpus(monkeypatch):
    """torch reports two CUDA devices (nothing runs on them)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_the_flow_runs_one_worker_per_gpu(two_gpus):
    """With two GPUs visible and --device cuda, the threads runner becomes one Dask worker per
    GPU, each seeing only its own; a named subset, and a remote scheduler, are respected."""
    from flows.clean import task_runner_for

    runner = task_runner_for(FlowSettings(), "cuda")
    workers = runner.cluster_kwargs["workers"]
    assert runner.cluster_class == "distributed.SpecCluster" and list(workers) == ["gpu0", "gpu1"]
    assert [w["options"]["env"]["CUDA_VISIBLE_DEVICES"] for w in workers.values()] == ["0", "1"]
    assert all(w["options"]["nthreads"] == 2 for w in workers.values())  # two shards at once (run/shards.py)
    assert list(task_runner_for(FlowSettings(devices="cuda:1"), "cuda").cluster_kwargs["workers"]) == ["gpu1"]
    assert type(task_runner_for(FlowSettings(), "cpu")).__name__ == "ThreadPoolTaskRunner"
    assert task_runner_for(FlowSettings(task_runner="dask", dask_address="tcp://127.0.0.1:8786"), "cuda").address


def test_two_pinned_workers_take_the_mapped_tasks(two_gpus):
    """A real cluster from the flow's specification: two worker processes, each with its own
    CUDA_VISIBLE_DEVICES, and Prefect tasks mapped over them run on both."""
    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    from flows.clean import task_runner_for

    @task
    def where(i: int) -> tuple[str, str, int]:
        import time

        time.sleep(0.5)  # long enough that one worker cannot take every task
        return os.environ["CUDA_VISIBLE_DEVICES"], os.environ[GPU_ENV], os.getpid()

    @flow(task_runner=task_runner_for(FlowSettings(), "cuda"))
    def spread() -> list:
        return [f.result() for f in where.map(range(8))]

    with prefect_test_harness(server_startup_timeout=120):
        seen = spread()
    assert {(gpu, env) for gpu, env, _ in seen} == {("0", "cuda:0"), ("1", "cuda:1")}
    assert len({pid for _, _, pid in seen}) == 2 and os.getpid() not in {pid for _, _, pid in seen}
