"""A real Prefect server on 127.0.0.1: deploy from prefect.yaml, run clean/demo through a
process worker with `prefect deployment run`, then rerun on a grown dataset."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMScheduler
from PIL import Image

from pipeline.fields import options
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Prefect server at {url} did not come up in {timeout}s")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_CLI_PROMPT": "false", "MEMCLEAN_CACHE": str(tmp_path / "cache")}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(env["PREFECT_API_URL"])
        yield env
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM a process group, then SIGKILL it after `grace` seconds. Prefect's worker can
    outlast any grace: on SIGTERM it forwards SIGINT to its runner, whose failed polls back
    off for 20 s and more before it exits (seen once in CI, after both runs had passed)."""
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=grace)


def prefect(env, *args, cwd, timeout=300):
    r = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def deployable_copy(project: Path) -> Path:
    """A copy of the repository's deployable parts (prefect.yaml, flows/), to deploy from."""
    project.mkdir()
    for name in ("prefect.yaml", "flows"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, project / name)
    return project


def deploy_and_start_worker(server, project: Path, log: Path) -> subprocess.Popen:
    """The work pool, `prefect deploy --all` from `project`, and a process worker running there."""
    prefect(server, "work-pool", "create", "memclean-process", "--type", "process", cwd=project)
    prefect(server, "--no-prompt", "deploy", "--all", cwd=project)
    return subprocess.Popen([PREFECT, "worker", "start", "--pool", "memclean-process"], env=server, cwd=project,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def png_whose_sha256_ends_in_nul(rng) -> bytes:
    """A 10x10 RGB PNG whose file sha256 ends in the byte 0x00 (1 in 256 random images)."""
    import hashlib
    import io

    while True:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(buf, "PNG")
        if hashlib.sha256(buf.getvalue()).digest()[-1] == 0:
            return buf.getvalue()


def test_deploy_and_run_clean_demo_through_a_worker(server, tmp_path):
    project = deployable_copy(tmp_path / "project")
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(data / f"i{i}.png")
    (data / "i5.png").write_bytes(png_whose_sha256_ends_in_nul(rng))  # the cache once never found these
    model = save_checkpoint(tiny_unet(channels=3, size=8), DDPMScheduler(), tmp_path / "model")
    out = tmp_path / "out"

    worker = deploy_and_start_worker(server, project, tmp_path / "worker.log")
    try:
        params = ["--param", f"data={data}", "--param", f"model={model}", "--param", f"out={out}",
                  "--param", "reference=null", "--param", "solver=euler", "--param", "steps=2", "--param", "precision_target=0",
                  "--param", "batch_size=4"]
        prefect(server, "deployment", "run", "clean/demo", *params, "--watch", "--watch-timeout", "300", cwd=project)
        first = json.loads((out / "manifest.json").read_text())
        assert first["counts"]["input"] == 6 and first["scoring"]["scored_fresh"] == 6
        assert (out / "cleaned").is_dir() and (out / "_COMPLETE").is_file()

        Image.new("RGB", (10, 10), (3, 2, 1)).save(data / "new.png")
        prefect(server, "deployment", "run", "clean/demo", *params, "--watch", "--watch-timeout", "300", cwd=project)
        second = json.loads((out / "manifest.json").read_text())
        assert second["counts"]["input"] == 7
        assert second["scoring"]["scored_fresh"] == 1 and second["scoring"]["reused"] == 6
        prefect(server, "deployment", "run", "clean/demo", *params, "--watch", "--watch-timeout", "300", cwd=project)
        third = json.loads((out / "manifest.json").read_text())  # nothing new: nothing scored afresh
        assert third["scoring"]["scored_fresh"] == 0 and third["scoring"]["reused"] == 7
        listed = prefect(server, "deployment", "ls", cwd=project)
        assert "clean/celeba" in listed and "clean/demo" in listed
    finally:
        stop_group(worker)


def test_every_deployment_names_only_flow_parameters_with_valid_values():
    """prefect.yaml is the one source of the demo's settings (`memclean demo` reads it): every
    parameter a deployment sets is one of the flow's (derived from the settings model), and
    the values build valid settings."""
    import yaml

    import inspect

    from flows import clean, drops, verify
    from memclean.cli import demo_parameters
    from pipeline.run.settings import FlowSettings, RunSettings, VerifySettings

    root = Path(__file__).resolve().parent.parent
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    flows = {"flows/clean.py:clean": clean.clean, "flows/drops.py:clean_drops": drops.clean_drops,
             "flows/verify.py:verify": verify.verify}
    flow_names = {o.name for o in options(FlowSettings)}
    for d in spec["deployments"]:
        params = d["parameters"]
        names = set(inspect.signature(flows[d["entrypoint"]].fn).parameters)
        assert set(params) <= names, (d["name"], set(params) - names)
        if d["entrypoint"] == "flows/verify.py:verify":
            VerifySettings.from_flat(params)
            continue
        own, per_drop = flow_names, {}
        if d["entrypoint"] == "flows/drops.py:clean_drops":  # the flow sets data and out for each drop
            assert {o.name for o in drops.PARAMETERS} <= set(params), d["name"]
            own, per_drop = flow_names | {o.name for o in drops.PARAMETERS}, {"data": "x", "out": "y"}
        RunSettings.from_flat({**per_drop, **{k: v for k, v in params.items() if k not in own}})
    demo = demo_parameters(root)
    assert Path(demo["model"]).is_dir() and "dup_threshold" not in demo  # auto: judged against chance


def test_the_drops_deployment_grows_the_catalog_through_a_worker(server, tmp_path):
    """clean-drops/celeba-drops through a real server and process worker: three drops, the third
    holding copies of the first's images, are accepted into the catalog in order, the copies
    dropped as already in the dataset; a second run finds nothing new and changes nothing."""
    from tests.test_drops import make_drops

    project = deployable_copy(tmp_path / "project")
    drops, dataset = tmp_path / "drops", tmp_path / "dataset"
    make_drops(drops)
    held = tmp_path / "heldout"  # the deployment calibrates by --flag-fpr against a reference
    make_drops(held, seed=1)
    model = save_checkpoint(tiny_unet(channels=3, size=8), DDPMScheduler(), tmp_path / "model")
    worker = deploy_and_start_worker(server, project, tmp_path / "worker.log")
    try:
        params = ["--param", f"drops={drops}", "--param", f"dataset={dataset}", "--param", f"model={model}",
                  "--param", f"reference={held / 'a'}", "--param", "solver=euler", "--param", "steps=2",
                  "--param", "precision_target=0", "--param", "batch_size=4", "--param", "action=dedup",
                  "--param", "device=cpu"]
        prefect(server, "deployment", "run", "clean-drops/celeba-drops", *params, "--watch", "--watch-timeout", "300",
                cwd=project)
        catalog = json.loads((dataset / "dataset.json").read_text())
        assert [p["drop"] for p in catalog["parts"]] == ["a", "b", "c"]
        assert [p["counts"]["kept"] for p in catalog["parts"]] == [4, 3, 1]
        c = json.loads((dataset / "parts" / "c" / "manifest.json").read_text())
        assert c["losses"]["in_earlier_output"] == 2 and (dataset / "parts" / "c" / "_COMPLETE").is_file()
        before = (dataset / "dataset.json").read_bytes()
        prefect(server, "deployment", "run", "clean-drops/celeba-drops", *params, "--watch", "--watch-timeout", "300",
                cwd=project)
        assert (dataset / "dataset.json").read_bytes() == before
    finally:
        stop_group(worker)
