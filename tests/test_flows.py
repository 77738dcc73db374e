"""The Prefect `clean` flow: under a test harness, on Dask, and validated before work."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from diffusers import DDPMScheduler
from PIL import Image

from memclean.cli import main
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet

FAST = dict(solver="euler", steps=2, batch_size=4, shard_size=4, precision_target=0.0)  # one scoring pass


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(data / f"r{i:02d}.png")
    for c in range(3):
        Image.fromarray(np.full((12, 12, 3), 90, dtype=np.uint8)).save(data / f"dup{c}.png")
    (data / "broken.png").write_bytes(b"\x89PNG broken")
    model = save_checkpoint(tiny_unet(channels=3, size=8), DDPMScheduler(), tmp_path / "model")
    return tmp_path, data, model


def scores(out):
    cols = ["id", "status", "log_volume_growth", "action", "dup_of"]
    return pq.read_table(out / "scores.parquet", columns=cols).sort_by("id").to_pylist()


def test_flow_matches_the_library_run_and_publishes_artifacts(harness, setup):
    from prefect.client.orchestration import get_client

    from flows.clean import clean

    tmp, data, model = setup
    m = clean(data=str(data), model=str(model), out=str(tmp / "flow"), cache_dir=str(tmp / "c1"), **FAST)
    assert main(["clean", "--data", str(data), "--model", str(model), "--out", str(tmp / "cli"), "--no-cache",
                 "--solver", "euler", "--steps", "2", "--batch-size", "4", "--shard-size", "4", "--precision-target", "0"]) == 0
    assert scores(tmp / "flow") == scores(tmp / "cli")
    assert m["counts"]["input"] == 14 and m["counts"]["rejected"] == 1 and m["scoring"]["scored_fresh"] == 13

    import asyncio

    async def artifacts():
        async with get_client() as client:
            return {a.key: a for a in await client.read_artifacts() if a.key}

    found = asyncio.run(artifacts())
    assert {"memclean-summary", "memclean-top-flagged", "memclean-scoring"} <= set(found)
    assert "14 inputs" in found["memclean-summary"].data


def test_rerun_reuses_cached_shards(harness, setup):
    from flows.clean import clean

    tmp, data, model = setup
    clean(data=str(data), model=str(model), out=str(tmp / "o"), cache_dir=str(tmp / "c"), **FAST)
    Image.new("RGB", (12, 12), (1, 2, 3)).save(data / "zz_new.png")
    m = clean(data=str(data), model=str(model), out=str(tmp / "o"), cache_dir=str(tmp / "c"), overwrite=True, **FAST)
    assert m["scoring"]["scored_fresh"] == 1 and m["scoring"]["reused"] == 13


def test_dask_local_cluster_gives_the_same_scores(harness, setup):
    from flows.clean import clean

    tmp, data, model = setup
    clean(data=str(data), model=str(model), out=str(tmp / "threads"), no_cache=True, **FAST)
    clean(data=str(data), model=str(model), out=str(tmp / "dask"), no_cache=True, task_runner="dask",
          dask_workers=2, **FAST)
    a, b = scores(tmp / "threads"), scores(tmp / "dask")
    # Dask workers run torch with one thread: float32 sums in another order inside the network,
    # 2^-23 relative per evaluation, carried through the (here 2-step Euler) NFE-term sum of V:
    # within 64 * 2^-23 of |V| (as tests/test_volume.py's batch-invariance bound)
    assert [{k: v for k, v in r.items() if k != "log_volume_growth"} for r in a] == \
        [{k: v for k, v in r.items() if k != "log_volume_growth"} for r in b]
    for r, q in zip(a, b):
        assert r["log_volume_growth"] == pytest.approx(q["log_volume_growth"], rel=64 * 2.0**-23) \
            if r["log_volume_growth"] is not None else q["log_volume_growth"] is None


def test_bad_parameters_fail_before_any_work(harness, setup):
    from flows.clean import clean

    tmp, data, model = setup
    with pytest.raises(Exception, match="solver|literal|Literal"):
        clean(data=str(data), model=str(model), out=str(tmp / "x"), solver="rk45")
    with pytest.raises(ValueError, match="probes"):
        clean(data=str(data), model=str(model), out=str(tmp / "x"), probes=0, cache_dir=str(tmp / "c"))
    assert not (tmp / "x").exists() and not (tmp / "c").exists()  # nothing scored, nothing cached
    assert not list(tmp.glob(".x*"))  # no staging folder was opened


def test_a_failed_shard_is_retried_without_duplicating_rows(harness, setup, monkeypatch):
    """A shard task that fails after writing its files (a worker lost mid-result) is retried by
    Prefect (retries=1); the retry rewrites the same shard files atomically: every input once."""
    import flows.clean as fc

    tmp, data, model = setup
    real, failed = fc.score_shard, []

    def flaky(job, shard, name, embed):
        result = real(job, shard, name, embed)
        if name.endswith("-000001") and not failed:
            failed.append(name)
            raise OSError("worker lost")
        return result

    monkeypatch.setattr(fc, "score_shard", flaky)
    m = fc.clean(data=str(data), model=str(model), out=str(tmp / "retried"), no_cache=True, **FAST)
    monkeypatch.setattr(fc, "score_shard", real)
    fc.clean(data=str(data), model=str(model), out=str(tmp / "plain"), no_cache=True, **FAST)
    assert failed == ["input-000001"]
    rows = scores(tmp / "retried")
    assert len({r["id"] for r in rows}) == len(rows) == m["counts"]["input"] == 14
    assert rows == scores(tmp / "plain")


def test_dask_workers_get_their_share_of_the_cores_and_this_flow_s_api(harness):
    """Each LocalCluster worker: cores / workers torch threads (else every worker's torch takes
    every core), and the API this process reports to (else each worker process starts an
    ephemeral Prefect server of its own and its task runs go there)."""
    import os

    from flows.clean import api_url, task_runner_for
    from pipeline.run.settings import FlowSettings

    from distributed import Nanny

    env = task_runner_for(FlowSettings(task_runner="dask", dask_workers=2)).cluster_kwargs["env"]
    # and not Dask's MALLOC_TRIM_THRESHOLD_, which made every large tensor a fresh mmap (1.6x slower)
    assert "MALLOC_TRIM_THRESHOLD_" not in Nanny("tcp://127.0.0.1:9", env=env).env
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert env["OMP_NUM_THREADS"] == env["MEMCLEAN_TORCH_THREADS"] == threads
    assert env["PREFECT_API_URL"] == api_url() and api_url().startswith("http://127.0.0.1")


def test_the_flow_calls_the_library_public_steps_only():
    """flows/clean.py imports no private name from the library, and from the clean run only
    its public steps (the same ones lifecycle.run_clean, the CLI's path, calls)."""
    import ast
    import inspect

    import flows.clean
    from pipeline.run import lifecycle

    tree = ast.parse(inspect.getsource(flows.clean))
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("pipeline") for a in n.names}
    assert not [name for _, name in imported if name.startswith("_")]
    steps = {name for module, name in imported if module == "pipeline.run.lifecycle"}
    assert steps == {"RunContext", "start_run", "score_sources", "finish_run"}
    run_clean = inspect.getsource(lifecycle.run_clean)
    assert all(step in run_clean for step in ("start_run", "score_sources", "finish_run"))


def test_the_flow_refuses_a_run_that_would_empty_the_dataset(harness, setup):
    """The scheduled flow fails as the CLI does, rather than publishing an emptied dataset: at
    --dup-threshold -1 every image joins one cluster; nothing is committed, the plan is beside."""
    from flows.clean import clean
    from pipeline.run.lifecycle import PlanRefused

    tmp, data, model = setup
    with pytest.raises(PlanRefused, match="would remove"):
        clean(data=str(data), model=str(model), out=str(tmp / "flow"), dup_threshold=-1.0, no_cache=True, **FAST)
    assert not (tmp / "flow").exists() and (tmp / "flow.plan" / "scores.parquet").is_file()


def test_the_verify_flow_matches_memclean_verify(harness, tmp_path):
    """The flow `verify` (to schedule after a training run) writes what the command writes."""
    import json

    from flows.verify import verify
    from tests.exact import tiny_unet as unet_of

    rng = np.random.default_rng(0)
    data = tmp_path / "train"
    data.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / f"t{i}.png")
    model = save_checkpoint(unet_of(channels=3, size=8), DDPMScheduler(), tmp_path / "model")
    common = dict(model=str(model), data=str(data), generations=6, sample_steps=3, cache_dir=str(tmp_path / "cache"))
    flow_m = verify(**common, out=str(tmp_path / "flow"))
    assert main(["verify", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in common.items()), []),
                 "--out", str(tmp_path / "cli")]) == 0
    cli_m = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert flow_m["copies"] == cli_m["copies"] and flow_m["similar"]["generations"] == cli_m["similar"]["generations"]
    assert cli_m["sampling"]["cached"] == 6  # the flow's generations, read back
    gens = [pq.read_table(tmp_path / d / "generations.parquet").drop(["image"]).to_pylist() for d in ("flow", "cli")]
    assert gens[0] == gens[1]
    with pytest.raises(ValueError, match="copy-ratio"):
        verify(**common, out=str(tmp_path / "bad"), copy_ratio=2.0)
