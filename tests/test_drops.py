"""The clean-drops flow (flows/drops.py), in process: drops found, each cleaned against the parts
accepted before it, a catalog that `datasets` reads, idempotent reruns, and a failing drop left
out of the catalog and retried."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from diffusers import DDPMScheduler
from PIL import Image

from tests.conftest import save_checkpoint
from tests.exact import tiny_unet

FAST = dict(solver="euler", steps=2, batch_size=4, shard_size=4, precision_target=0.0, no_cache=True,
            action="dedup")  # flagging on a random model is not what this tests


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_drops(root, seed: int = 0):
    """Three drops: a (4 images), b (3), c (exact copies of two of a's and one new)."""
    rng = np.random.default_rng(seed)
    for name, n in (("a", 4), ("b", 3), ("c", 1)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{name}{i}.png")
    for i in (0, 1):
        shutil.copy(root / "a" / f"a{i}.png", root / "c" / f"copy{i}.png")


def test_drops_are_cleaned_against_what_was_accepted(tmp_path, harness):
    from flows.drops import clean_drops

    drops, dataset = tmp_path / "drops", tmp_path / "dataset"
    make_drops(drops)
    model = save_checkpoint(tiny_unet(channels=3, size=8), DDPMScheduler(), tmp_path / "model")
    params = dict(drops=str(drops), dataset=str(dataset), model=str(model), **FAST)
    results = clean_drops(**params)
    assert list(results) == ["a", "b", "c"] and all(r["accepted"] for r in results.values())
    catalog = json.loads((dataset / "dataset.json").read_text())
    assert [p["drop"] for p in catalog["parts"]] == ["a", "b", "c"]
    c = json.loads((dataset / "parts" / "c" / "manifest.json").read_text())
    assert c["dedup"]["against"] == str(dataset / "dataset.json") and c["losses"]["in_earlier_output"] == 2
    rows = {r["id"]: r for r in pq.read_table(dataset / "parts" / "c" / "scores.parquet",
                                              columns=["id", "action", "dup_of"]).to_pylist()}
    assert rows["copy0.png"]["action"] == "dropped" and rows["copy0.png"]["dup_of"] == f"{dataset / 'parts' / 'a'}:a0.png"
    assert rows["c0.png"]["action"] == "kept"

    import datasets
    accepted = datasets.load_dataset("parquet", data_dir=str(dataset), data_files=catalog["data_files"], split="train")
    assert accepted.num_rows == 4 + 3 + 1  # c's two copies are in a already

    before = (dataset / "dataset.json").read_bytes()
    assert clean_drops(**params) == {}  # nothing new: nothing run, the catalog as it was
    assert (dataset / "dataset.json").read_bytes() == before

    (drops / "d").mkdir()
    (drops / "d" / "arrays.npy").write_bytes(b"x")  # no image: this drop fails
    (drops / "e").mkdir()
    Image.new("RGB", (12, 12), (9, 8, 7)).save(drops / "e" / "e0.png")
    with pytest.raises(Exception, match="1 drop\\(s\\) failed.*\\['d'\\]"):
        clean_drops(**params)
    catalog = json.loads((dataset / "dataset.json").read_text())
    assert [p["drop"] for p in catalog["parts"]] == ["a", "b", "c", "e"]  # d left out, e accepted
    Image.new("RGB", (12, 12), (1, 200, 3)).save(drops / "d" / "d0.png")  # fixed: retried next run
    assert list(clean_drops(**params)) == ["d"]
    assert [p["drop"] for p in json.loads((dataset / "dataset.json").read_text())["parts"]] == ["a", "b", "c", "e", "d"]

    import io
    import tarfile

    with tarfile.open(drops / "a.tar", "w") as tar:  # a shard named like the folder drop a
        buf = io.BytesIO()
        Image.new("RGB", (12, 12), (40, 90, 140)).save(buf, "PNG")
        info = tarfile.TarInfo("k0.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    a_scores = (dataset / "parts" / "a" / "scores.parquet").read_bytes()
    assert list(clean_drops(**params)) == ["a.tar"]
    parts = json.loads((dataset / "dataset.json").read_text())["parts"]
    assert [(p["drop"], p["out"]) for p in parts][-1] == ("a.tar", "parts/a.tar")
    assert (dataset / "parts" / "a" / "scores.parquet").read_bytes() == a_scores  # a's part is not overwritten


def test_part_names_never_reuse_an_accepted_part():
    from pathlib import Path

    from flows.drops import part_name

    assert part_name(Path("day1.tar")) == "day1" and part_name(Path("day1.parquet")) == "day1"
    assert part_name(Path("day1")) == "day1" and part_name(Path(".tar")) == ".tar"
    assert part_name(Path("day1.tar"), {"day1"}) == "day1.tar"
    assert part_name(Path("day1"), {"day1"}) == "day1-2"
    assert part_name(Path("day1"), {"day1", "day1-2"}) == "day1-3"


def test_a_second_drops_run_on_a_dataset_waits_its_turn(tmp_path, harness):
    """Two runs would each rewrite the catalog from their own copy, losing the other's parts:
    while one holds the dataset, another fails at once and the catalog is not touched."""
    from flows.drops import clean_drops
    from pipeline.io.store import OutputLock

    drops, dataset = tmp_path / "drops", tmp_path / "dataset"
    make_drops(drops)
    dataset.mkdir()
    held = OutputLock(dataset)
    try:
        with pytest.raises(Exception, match="another memclean run"):
            clean_drops(drops=str(drops), dataset=str(dataset), model=str(tmp_path / "no-model"), **FAST)
    finally:
        held.release()
    assert not (dataset / "dataset.json").exists() and not (dataset / "parts").exists()


def test_a_bad_parameter_fails_the_run_once_before_any_drop(tmp_path, harness):
    """A value no run accepts is the flow's one error, raised before the dataset is touched,
    not the same failure logged for every drop."""
    from flows.drops import clean_drops

    drops, dataset = tmp_path / "drops", tmp_path / "dataset"
    make_drops(drops)
    with pytest.raises(Exception, match="clean-drops parameters: --flag-fpr must be"):
        clean_drops(drops=str(drops), dataset=str(dataset), model=str(tmp_path / "no-model"), flag_fpr=2.0,
                    **FAST)
    assert not dataset.exists()
