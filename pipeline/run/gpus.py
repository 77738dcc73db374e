"""One scoring worker per GPU: which CUDA devices a run's shards are spread over.

A flow whose --device is cuda, on a machine where torch sees more than one CUDA device, scores
with one Dask worker per device (or per device that `devices` names: cuda:0,cuda:2). Each
worker process sees only its own device (CUDA_VISIBLE_DEVICES), loads the model once, and takes
shards as they free up; inside it the device is `cuda`. A remote scheduler (dask_address)
brings its own workers and is left as it is.
"""
from __future__ import annotations

from dataclasses import replace

from pipeline.fields import check_device

GPU_ENV = "MEMCLEAN_GPU"  # set in a worker pinned to one GPU: the CUDA device it was given


def parse_devices(devices: str) -> list[int]:
    """'cuda:0,cuda:2' -> [0, 2]: each one cuda:N, none twice; errors name the bad entry."""
    out = []
    for entry in (e.strip() for e in devices.split(",")):
        check_device(entry, "--devices")
        if ":" not in entry:
            raise ValueError(f"--devices {entry!r}: name each device with its index (cuda:0,cuda:1)")
        index = int(entry.split(":")[1])
        if index in out:
            raise ValueError(f"--devices names cuda:{index} twice")
        out.append(index)
    return out


def worker_gpus(devices: str | None, device: str, visible: int) -> list[int]:
    """The CUDA devices that get a worker each: those `devices` names, else every one of the
    `visible` devices when --device is cuda and there are several; [] for one worker as before."""
    if devices is not None:
        if not str(device).startswith("cuda"):
            raise ValueError(f"--devices {devices!r} spreads scoring over CUDA devices; --device is {device!r}")
        gpus = parse_devices(devices)
        past = [g for g in gpus if g >= visible]
        if past:
            raise ValueError(f"--devices {devices!r}: torch sees {visible} CUDA device(s), numbered from 0")
        return gpus
    if str(device) == "cuda" and visible > 1:
        return list(range(visible))
    return []


def pinned(job, environ) -> object:
    """A ScoreJob as a pinned worker runs it: on `cuda`, the one device it sees (environ: the
    worker's environment; a job elsewhere is returned as it is)."""
    if GPU_ENV not in environ:
        return job
    return replace(job, settings=replace(job.settings, model=replace(job.settings.model, device="cuda")))
