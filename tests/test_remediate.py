"""Dedup, calibrated flags and augment-and-rescore through `memclean clean`."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDPMScheduler

import transforms
from pipeline.cli import main
from pipeline.data import ImageSpec, decode_image, open_image
from pipeline.models import load_model
from pipeline.remediate import RemediationSettings, plan, to_array
from pipeline.volume import ScorerSettings, log_volume_growth
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet
from tests.planted import planted_set

FAST = ["--solver", "euler", "--steps", "2", "--batch-size", "16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rem")
    truth = planted_set(root / "train", n_unique=40, n_groups=5)
    planted_set(root / "heldout", n_unique=40, n_groups=0, seed=1)
    model = save_checkpoint(tiny_unet(channels=3, size=8), DDPMScheduler(), root / "model")
    return root, truth, model


def clean(root, model, out, *extra):
    assert main(["clean", "--data", str(root / "train"), "--model", str(model), "--out", str(root / out),
                 "--overwrite", *FAST, *extra]) == 0
    rows = pq.read_table(root / out / "scores.parquet").to_pylist()
    return {r["id"]: r for r in rows}, json.loads((root / out / "manifest.json").read_text())


def test_duplicates_collapse_to_their_lowest_risk_member(setup):
    root, truth, model = setup
    rows, m = clean(root, model, "dedup", "--action", "dedup")
    for g in range(5):
        members = [rows[i] for i in rows if truth[i] == g]
        assert len({r["dup_cluster"] for r in members}) == 1 and members[0]["dup_cluster"] is not None
        keeper = min(members, key=lambda r: (r["log_volume_growth"], r["id"]))
        assert keeper["action"] == "kept" and keeper["dup_of"] is None
        for r in members:
            if r is not keeper:
                assert r["action"] == "dropped" and r["dup_of"] == keeper["id"]
                assert r["action_reason"] == f"duplicate of {keeper['id']}"
    uniques = [rows[i] for i in rows if truth[i] == -1]
    assert sum(r["dup_cluster"] is not None for r in uniques) <= 2  # precision: few false joins
    assert m["dedup"]["clusters"] >= 5 and m["counts"]["dropped"] >= 5 * 5
    assert (root / "dedup" / "index.faiss").is_file() and (root / "dedup" / "embeddings.parquet").is_file()


def test_reference_calibration_in_the_run(setup):
    root, _, model = setup
    rows, m = clean(root, model, "ref", "--reference", str(root / "heldout"), "--flag-fpr", "0.1", "--action", "none")
    ref = pq.read_table(root / "ref" / "reference_scores.parquet").column("log_volume_growth").to_numpy()
    t = m["threshold"]
    assert t["policy"] == "reference_fpr" and t["value"] == pytest.approx(np.quantile(ref, 0.9))
    assert t["details"]["n_reference"] == 40 and t["details"]["ci"][0] <= t["value"] <= t["details"]["ci"][1]
    flagged = [r for r in rows.values() if r["flagged"]]
    assert t["realised_flag_rate"] == pytest.approx(len(flagged) / len(rows))
    assert all(r["action"] == "kept" for r in rows.values())
    assert m["reference"]["scored"] == 40 and m["counts"]["input"] == len(rows)


def test_augment_and_rescore(setup):
    root, _, model = setup
    rows, m = clean(root, model, "aug", "--action", "augment", "--flag-quantile", "0.5", "--augment-tries", "3",
                    "--on-failure", "keep")
    threshold = m["threshold"]["value"]
    augmented = [r for r in rows.values() if r["action"] == "augmented"]
    failed = [r for r in rows.values() if r["flagged"] and r["action"] == "kept"]
    assert augmented and len(augmented) + len(failed) == m["counts"]["flagged"]
    assert all(r["augment_tries"] == 3 and r["augmented_score"] >= threshold for r in failed)
    cleaned = {r["id"]: r for r in pq.read_table(root / "aug" / "cleaned").to_pylist()}
    loaded = load_model(model)
    spec = ImageSpec(3, (8, 8))
    scorer = ScorerSettings(solver="euler", steps=2)
    for r in augmented:
        assert r["augmented_score"] < threshold
        record = json.loads(r["augmentation"])
        assert record["preset"] == r["augment_preset"] in transforms.PRESETS
        original = to_array(open_image((root / "train" / r["id"]).read_bytes(), spec))
        replayed = transforms.replay(record, original)
        stored = to_array(open_image(cleaned[r["id"]]["image"]["bytes"], spec))
        assert np.array_equal(replayed, stored) and not np.array_equal(stored, original)
        assert cleaned[r["id"]]["log_volume_growth"] == r["augmented_score"]
        rescore = log_volume_growth(loaded.score_fn, decode_image(cleaned[r["id"]]["image"]["bytes"], spec)[None], scorer)
        assert float(rescore.log_volume_growth) == pytest.approx(r["augmented_score"], rel=1e-5)


def test_against_an_earlier_output(setup, capsys):
    root, truth, model = setup
    clean(root, model, "first", "--action", "dedup")
    rows, m = clean(root, model, "second", "--action", "dedup", "--against", str(root / "first"))
    # everything in the second drop was already cleaned once: nothing new survives
    assert m["counts"]["kept"] == 0
    assert all(r["dup_of"] is not None for r in rows.values())
    rc = main(["clean", "--data", str(root / "train"), "--model", str(model), "--out", str(root / "x"),
               "--against", str(root / "first"), "--embedder", "unet", *FAST])
    assert rc == 2 and "cannot be compared" in capsys.readouterr().err
    assert not (root / "x").exists()


def test_plan_covers_every_action():
    ok = np.array([True, True, True, True, False])
    flagged = np.array([True, False, True, False, False])
    dup_of = [None, None, None, "a", None]
    for mode, expected in {
        "auto": ["augmented", "kept", "augmented", "dropped", "rejected"],
        "dedup": ["kept", "kept", "kept", "dropped", "rejected"],
        "augment": ["augmented", "kept", "augmented", "kept", "rejected"],
        "drop": ["dropped", "kept", "dropped", "kept", "rejected"],
        "none": ["kept", "kept", "kept", "kept", "rejected"],
    }.items():
        action, _, augment = plan(ok, flagged, dup_of, RemediationSettings(action=mode))
        assert action == expected, mode
        assert augment.tolist() == [a == "augmented" for a in expected]
    with pytest.raises(ValueError):
        RemediationSettings(action="purge")
