"""Dedup, calibrated flags and augment-and-rescore through `memclean clean`."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from diffusers import DDPMScheduler

import transforms
from memclean.cli import main
from pipeline.io.data import ImageSpec, decode_image, open_image
from pipeline.score.models import load_model
from pipeline.decide.flagging import Threshold
from pipeline.decide.remediate import Attempt, RemediationSettings, next_level, plan, to_array, verdict
from pipeline.score.volume import ScorerSettings, log_volume_growth
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet
from tests.planted import planted_set

# one pass, judged by V: these tests follow V through remediation (re-scored with log_volume_growth)
FAST = ["--solver", "euler", "--steps", "2", "--batch-size", "16", "--precision-target", "0", "--score",
        "log_volume_growth"]


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


@pytest.mark.parametrize("band", ["0.01", "0.3"])
def test_augment_and_rescore(setup, band):
    """Accepted variants lie in the accept band [q, threshold] (q: the --accept-band quantile of
    the dataset's scores, as there is no reference), never above the threshold (the one flag
    rule) or below the band; the others say which side they fell on."""
    root, _, model = setup
    rows, m = clean(root, model, f"aug{band}", "--action", "augment", "--flag-quantile", "0.5",
                    "--augment-tries", "3", "--on-failure", "keep", "--accept-band", band)
    threshold = m["threshold"]["value"]
    low, high = m["threshold"]["details"]["accept_band"]
    ok = [r["log_volume_growth"] for r in rows.values() if r["status"] == "ok"]
    assert high == threshold and low == pytest.approx(np.quantile(ok, float(band)))
    assert m["threshold"]["details"]["accept_band_of"] == "dataset"
    augmented = [r for r in rows.values() if r["action"] == "augmented"]
    failed = [r for r in rows.values() if r["flagged"] and r["action"] == "kept"]
    assert len(augmented) + len(failed) == m["counts"]["flagged"]
    for r in failed:
        assert r["augment_tries"] == 3 and not low <= r["augmented_score"] <= threshold
        side = "above the threshold" if r["augmented_score"] > threshold else "below the accept band"
        assert side in r["action_reason"]
    cleaned = {r["id"]: r for r in pq.read_table(root / f"aug{band}" / "cleaned").to_pylist()}
    loaded = load_model(model)
    spec = ImageSpec(3, (8, 8))
    scorer = ScorerSettings(solver="euler", steps=2)
    for r in augmented:
        assert low <= r["augmented_score"] <= threshold
        record = json.loads(r["augmentation"])
        assert record["preset"] == r["augment_preset"] in transforms.PRESETS
        original = to_array(open_image((root / "train" / r["id"]).read_bytes(), spec))
        replayed = transforms.replay(record, original)
        stored = to_array(open_image(cleaned[r["id"]]["image"]["bytes"], spec))
        assert np.array_equal(replayed, stored) and not np.array_equal(stored, original)
        assert cleaned[r["id"]]["log_volume_growth"] == r["augmented_volume_growth"] == r["augmented_score"]
        assert cleaned[r["id"]]["judged_score"] == r["augmented_score"]
        assert cleaned[r["id"]]["judged_by"] == "log_volume_growth"
        rescore = log_volume_growth(loaded.score_fn, decode_image(cleaned[r["id"]]["image"]["bytes"], spec)[None], scorer)
        # same probes (a hash of the pixels); only the float32 network's batch rounding differs
        assert float(rescore.log_volume_growth) == pytest.approx(r["augmented_score"], rel=64 * 2.0**-23)
    if band == "0.01":
        assert augmented


def test_verdicts_and_preset_levels():
    t = Threshold(10.0, "absolute")
    assert [verdict(v, t, 2.0) for v in (10.0, 2.0, 10.5, 1.9, float("nan"))] == [
        "accepted", "accepted", "above the threshold", "below the accept band", "not finite"]
    assert verdict(-1e9, t, None) == "accepted"
    up = Attempt(False, 1, "light", 11.0, {}, None, 0, "above the threshold")
    down = Attempt(False, 1, "medium", 1.0, {}, None, 1, "below the accept band")
    assert next_level(up) == 1 and next_level(down) == 0
    assert next_level(Attempt(False, 1, "strong", 11.0, {}, None, 2, "above the threshold")) == 2
    assert next_level(Attempt(False, 1, "light", 1.0, {}, None, 0, "below the accept band")) == 0


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
    for mode, expected in {  # None: to augment, undecided until settle
        "auto": [None, "kept", None, "dropped", "rejected"],
        "dedup": ["kept", "kept", "kept", "dropped", "rejected"],
        "augment": [None, "kept", None, "kept", "rejected"],
        "drop": ["dropped", "kept", "dropped", "kept", "rejected"],
        "none": ["kept", "kept", "kept", "kept", "rejected"],
    }.items():
        action, _, augment = plan(ok, flagged, dup_of, RemediationSettings(action=mode))
        assert action == expected, mode
        assert augment.tolist() == [a is None for a in expected]
    for bad in (dict(action="purge"), dict(tries=0), dict(tries=21), dict(accept_band=0.5), dict(accept_band=-0.1)):
        with pytest.raises(ValueError):
            RemediationSettings(**bad)


def decisions(rows):
    """A decided table from hand-written rows (id, score, flagged, dup_cluster, dup_of, action)."""
    import pyarrow as pa

    keys = ("id", "log_volume_growth", "flagged", "dup_cluster", "dup_of", "action")
    cols = {k: [r[i] for r in rows] for i, k in enumerate(keys)}
    n = len(rows)
    cols.update(status=["ok"] * n, reject_reason=[None] * n, flag_reason=[("f" if f else None) for f in cols["flagged"]],
                dup_similarity=[1.0 if k is not None else None for k in cols["dup_cluster"]],
                action_reason=[f"duplicate of {d}" if d else None for d in cols["dup_of"]],
                augmented_png=[None] * n)
    types = {"dup_cluster": pa.int64(), "dup_similarity": pa.float32(), "log_volume_growth": pa.float64(),
             "flagged": pa.bool_()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


def test_reject_changed_gives_a_cluster_a_new_keeper_and_leaves_the_rest_consistent():
    """Hand-built decisions. Cluster 0: keeper a changed; b (risk 2) and c (risk 1) were its
    copies: c, the lowest risk, keeps the picture and b names it. Cluster 1: keeper d kept, copy e
    changed: d is alone and no cluster. Cluster 2: keeper f duplicated an earlier output's image
    and changed: its copy g inherits that and stays dropped. Cluster 3: flagged keeper h changed
    under --action auto: its flagged copy i cannot be augmented any more, so on-failure decides."""
    from pipeline.decide.remediate import reject_changed

    t = decisions([("a", 0.0, False, 0, None, "kept"), ("b", 2.0, False, 0, "a", "dropped"),
                   ("c", 1.0, False, 0, "a", "dropped"), ("d", 0.0, False, 1, None, "kept"),
                   ("e", 5.0, True, 1, "d", "dropped"), ("f", 0.0, False, 2, "prev:z", "dropped"),
                   ("g", 1.0, False, 2, "f", "dropped"), ("h", 9.0, True, 3, None, "augmented"),
                   ("i", 9.5, True, 3, "h", "dropped"), ("j", 3.0, False, None, None, "kept")])
    auto = RemediationSettings(action="auto", on_failure="keep")
    out = {r["id"]: r for r in reject_changed(t, {"a", "e", "f", "h", "zz"}, "log_volume_growth", auto).to_pylist()}
    for gone in "aefh":
        assert (out[gone]["status"], out[gone]["reject_reason"], out[gone]["action"]) == \
            ("rejected", "changed_during_run", "rejected"), gone
        assert out[gone]["flagged"] is None and out[gone]["dup_cluster"] is None and out[gone]["dup_of"] is None
    assert (out["c"]["dup_of"], out["c"]["action"], out["c"]["dup_cluster"]) == (None, "kept", 0)
    assert (out["b"]["dup_of"], out["b"]["action"], out["b"]["action_reason"]) == ("c", "dropped", "duplicate of c")
    assert (out["d"]["dup_cluster"], out["d"]["dup_of"], out["d"]["action"]) == (None, None, "kept")
    assert (out["g"]["dup_of"], out["g"]["action"], out["g"]["dup_cluster"]) == ("prev:z", "dropped", None)
    assert out["i"]["dup_of"] is None and out["i"]["action"] == "kept" and "no augmentation tried" in out["i"]["action_reason"]
    assert out["j"] == {**out["j"], "action": "kept", "status": "ok"}
    dropping = reject_changed(t, {"h"}, "log_volume_growth", RemediationSettings(action="auto"))
    assert dropping.column("action").to_pylist()[8] == "dropped"  # on failure: drop (the default)
    assert reject_changed(t, {"nothing here"}, "log_volume_growth", auto) is t  # no change: the same table


def test_flagged_images_open_in_datasets_pyarrow_and_duckdb(setup):
    """flagged.parquet shows the flagged images themselves: `image` is the original file and
    `augmented_image` the accepted variant, decoded by datasets with no glue; each equals its
    source pixel for pixel (the variant: transforms.replay of its record), highest score first."""
    import datasets
    import duckdb
    from PIL import Image

    root, _, model = setup
    rows, m = clean(root, model, "shown", "--action", "augment", "--flag-quantile", "0.5", "--on-failure", "keep")
    path = root / "shown" / "flagged.parquet"
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["augmented_image"], datasets.Image)
    assert len(ds) == m["counts"]["flagged"]
    scores = ds["log_volume_growth"]
    assert scores == sorted(scores, reverse=True)
    spec = ImageSpec(3, (8, 8))
    augmented = 0
    for r in ds:
        source = Image.open(root / "train" / r["id"])
        assert np.array_equal(np.asarray(r["image"]), np.asarray(source)), r["id"]
        if r["action"] == "augmented":
            augmented += 1
            replayed = transforms.replay(r["augmentation"], to_array(open_image((root / "train" / r["id"]).read_bytes(), spec)))
            assert np.array_equal(to_array(r["augmented_image"].convert("RGB")), replayed)
        else:
            assert r["augmented_image"] is None
    assert augmented == m["counts"]["augmented"] > 0
    t = pq.read_table(path)
    assert t.column("id").to_pylist() == ds["id"]
    top = duckdb.sql(f"select id, action, dup_cluster, octet_length(image.bytes) from read_parquet('{path}') "
                     "order by log_volume_growth desc limit 3").fetchall()
    assert [r[0] for r in top] == ds["id"][:3] and all(r[3] > 0 for r in top)
    assert m["image_bytes"]["flagged"] > 0 and m["image_bytes"]["cleaned"] > 0
    assert "image" not in pq.read_schema(root / "shown" / "scores.parquet").names  # scores stay light


def test_losses_count_the_pictures_that_leave_the_dataset():
    """Hand-made decisions: an exact copy (same pixels) dropped beside its kept twin removes
    nothing; a near copy, a failed augmentation and a flagged drop each remove one picture; an
    exact copy of a keeper that was itself dropped removes its picture too."""
    import pyarrow as pa

    from pipeline.decide.remediate import GuardSettings, losses

    t = pa.table({
        "pixel_sha256": ["p1", "p1", "p2", "p3", "p4", "p4", "p5", "p6"],
        "action": ["kept", "dropped", "dropped", "dropped", "dropped", "dropped", "augmented", "rejected"],
        "action_reason": [None, "duplicate of a", "duplicate of a", "no augmentation in 3 tries ...", "flagged",
                          "duplicate of e", None, "could not be decoded"],
        "status": ["ok"] * 7 + ["rejected"]})
    lost = losses(t)
    assert lost == {"near_duplicate": 2, "failed_augmentation": 1, "flagged": 1, "other": 0, "removed": 4, "scored": 7,
                    "in_earlier_output": 0}
    earlier = t.append_column("dup_of", pa.array([None, "a", "prev:z", None, None, "e", None, None]))
    assert losses(earlier, ["prev"])["removed"] == 3  # p2 is in the earlier output already
    assert losses(earlier, ["prev"])["in_earlier_output"] == 1
    with pytest.raises(TypeError, match="list of outputs"):
        losses(earlier, "prev")
    assert GuardSettings(max_loss_fraction=0.6).refusal(lost) is None  # 4 / 7 = 57%
    message = GuardSettings(max_loss_fraction=0.5).refusal(lost)
    assert "remove 4 of its 7 scored pictures (57%)" in message and "2 joined as near duplicates" in message
    with pytest.raises(ValueError, match="max-loss-fraction"):
        GuardSettings(max_loss_fraction=0)


def test_a_failed_cluster_keeper_stays_once_and_a_failed_singleton_follows_on_failure():
    """--cluster-on-failure keep (the default): a duplicate cluster's flagged keeper whose variants
    all missed the band is kept (its copies stay dropped, so the picture is in the dataset once);
    a flagged image with no copies is dropped as --on-failure drop says; with
    --cluster-on-failure failure the keeper follows --on-failure too."""
    from pipeline.decide.remediate import Attempt, settle

    threshold = Threshold(10.0, "quantile", {})
    failed = Attempt(False, 3, "strong", 12.0, {}, Path("x.png"), 2, "above the threshold")
    for mode, expected in (("keep", ["kept", "dropped"]), ("failure", ["dropped", "dropped"])):
        action, reason = [None, None], [None, None]
        settle(action, reason, {"keeper": 0, "alone": 1}, {"keeper": failed, "alone": failed}, threshold, 5.0,
               RemediationSettings(cluster_on_failure=mode), keepers={"keeper"})
        assert action == expected, mode
        assert ("one copy" in reason[0]) == (mode == "keep") and "on failure: drop" in reason[1]
