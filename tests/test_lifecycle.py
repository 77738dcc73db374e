"""`memclean clean` end to end on a hostile corpus; the outputs opened by real readers."""
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from diffusers import DDPMScheduler
from PIL import Image

from memclean.cli import main
from pipeline.io.store import COMPLETE_MARKER
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet
from tests.test_data import hostile_folder

FAST = ["--solver", "euler", "--steps", "2", "--batch-size", "4", "--precision-target", "0"]  # one pass


@pytest.fixture
def model(tmp_path):
    return save_checkpoint(tiny_unet(channels=3, size=8), DDPMScheduler(), tmp_path / "model")


@pytest.fixture
def corpus(tmp_path):
    expected = hostile_folder(tmp_path / "data")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "data" / f"rand{i:02d}.png")
        expected[f"rand{i:02d}.png"] = None
    return tmp_path / "data", expected


def run(tmp_path, model, data, *extra):
    return main(["clean", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "out"),
                 "--max-pixels", "50000", *FAST, *extra])


def test_hostile_corpus_is_fully_accounted_for(tmp_path, model, corpus):
    data, expected = corpus
    assert run(tmp_path, model, data, "--action", "drop") == 0
    out = tmp_path / "out"
    assert (out / COMPLETE_MARKER).is_file()
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    assert sorted(r["id"] for r in scores) == sorted(expected)
    for r in scores:
        assert r["reject_reason"] == expected[r["id"]], r["id"]
        assert (r["action"] == "rejected") == (expected[r["id"]] is not None)
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["input"] == len(expected) == c["kept"] + c["augmented"] + c["dropped"] + c["rejected"]
    assert c["rejected"] == sum(v is not None for v in expected.values())
    assert c["scored"] == c["input"] - c["rejected"]
    judged = m["threshold"]["score"]  # the default score, whichever it is
    ok_scores = sorted(r[judged] for r in scores if r["status"] == "ok")
    assert m["threshold"]["value"] == pytest.approx(np.quantile(ok_scores, 0.95))
    assert c["flagged"] == c["dropped"] == sum(s > m["threshold"]["value"] for s in ok_scores) >= 1
    flagged = pq.read_table(out / "flagged.parquet").to_pylist()
    assert len(flagged) == c["flagged"] and all("quantile" in r["flag_reason"] for r in flagged)
    assert m["model"]["fingerprint"] and m["versions"]["torch"] and set(m["timings_s"]) >= {"score", "flag_and_dedup", "remediate"}
    assert m["reject_reasons"]["symlink_loop"] == 2
    if os.path.exists("/proc/self/status"):  # Linux: the memory each stage left held
        assert set(m["held_mb"]) == set(m["timings_s"]) and all(v > 0 for v in m["held_mb"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left


def test_cleaned_output_opens_in_datasets_pyarrow_and_duckdb(tmp_path, model, corpus):
    data, _ = corpus
    assert run(tmp_path, model, data) == 0
    cleaned = tmp_path / "out" / "cleaned"
    files = sorted(str(p) for p in cleaned.glob("*.parquet"))
    c = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    kept = c["kept"] + c["augmented"]

    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == kept
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]["image"]
    assert isinstance(first, Image.Image) and first.size[0] > 0

    import pyarrow.dataset as pds

    table = pds.dataset(str(cleaned), format="parquet").to_table()
    assert table.num_rows == kept and set(table.column("action").to_pylist()) <= {"kept", "augmented"}

    import duckdb

    n, distinct = duckdb.sql(f"select count(*), count(distinct id) from read_parquet('{cleaned}/*.parquet')").fetchall()[0]
    assert n == distinct == kept
    ids = {r[0] for r in duckdb.sql(f"select id from read_parquet('{tmp_path}/out/scores.parquet') "
                                     "where action in ('kept', 'augmented')").fetchall()}
    assert ids == set(table.column("id").to_pylist())


def test_rerun_refuses_without_overwrite(tmp_path, model, corpus, capsys):
    data, _ = corpus
    assert run(tmp_path, model, data) == 0
    before = (tmp_path / "out" / "manifest.json").read_text()
    assert run(tmp_path, model, data) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").read_text() == before
    assert run(tmp_path, model, data, "--overwrite", "--flag-quantile", "0.5") == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["settings"]["flag_quantile"] == 0.5 and m["settings"]["solver"] == "euler"


def test_a_crash_leaves_no_output(tmp_path, model, corpus, monkeypatch):
    import pipeline.run.lifecycle

    data, _ = corpus

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline.run.lifecycle, "write_tables", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run(tmp_path, model, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model", "score-cache"]


def test_parquet_input_and_output_round_trip(tmp_path, model, corpus):
    """A cleaned output is itself a valid input."""
    data, _ = corpus
    assert run(tmp_path, model, data) == 0
    again = main(["clean", "--data", str(tmp_path / "out" / "cleaned"), "--model", str(model),
                  "--out", str(tmp_path / "out2"), *FAST])
    assert again == 0
    m1 = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    m2 = json.loads((tmp_path / "out2" / "manifest.json").read_text())["counts"]
    assert m2["input"] == m1["kept"] + m1["augmented"] and m2["rejected"] == 0


def test_a_grown_dataset_scores_only_its_new_images(tmp_path, model, corpus, capsys):
    data, _ = corpus
    assert run(tmp_path, model, data, "--shard-size", "5") == 0
    first = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert first["scoring"]["reused"] == 0 and first["scoring"]["scored_fresh"] == first["counts"]["scored"]
    Image.new("RGB", (12, 12), (5, 6, 7)).save(data / "new.png")
    assert run(tmp_path, model, data, "--overwrite", "--shard-size", "5") == 0
    second = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert second["scoring"]["scored_fresh"] == 1
    assert second["scoring"]["reused"] == first["counts"]["scored"]
    assert "scored 1 images afresh" in capsys.readouterr().out
    rows = pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()
    assert [r["id"] for r in rows if r["reused"] is False] == ["new.png"]


def test_a_killed_run_resumes_to_the_same_outputs(tmp_path, model, corpus, monkeypatch):
    import pipeline.score.scoring

    data, _ = corpus
    assert main(["clean", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "ref"),
                 "--max-pixels", "50000", "--no-cache", *FAST, "--batch-size", "2", "--shard-size", "2"]) == 0
    real, calls = pipeline.score.scoring.log_volume_growth, []

    def dies_on_the_fourth_batch(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("worker killed")
        return real(*a, **k)

    monkeypatch.setattr(pipeline.score.scoring, "log_volume_growth", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, model, data, "--batch-size", "2", "--shard-size", "2")
    monkeypatch.setattr(pipeline.score.scoring, "log_volume_growth", real)
    assert not (tmp_path / "out").exists()
    assert run(tmp_path, model, data, "--batch-size", "2", "--shard-size", "2") == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sc = m["scoring"]
    assert 3 <= sc["reused"] <= 6 and sc["reused"] + sc["scored_fresh"] == m["counts"]["scored"]  # 3 batches of <= 2
    drop = {"reused", "path", "pixel_sha256"}
    cols = [c for c in pq.read_schema(tmp_path / "ref" / "scores.parquet").names if c not in drop]
    a = pq.read_table(tmp_path / "ref" / "scores.parquet", columns=cols).to_pylist()
    b = pq.read_table(tmp_path / "out" / "scores.parquet", columns=cols).to_pylist()
    assert a == b
    ca = pq.read_table(tmp_path / "ref" / "cleaned").sort_by("id")
    cb = pq.read_table(tmp_path / "out" / "cleaned").sort_by("id")
    assert ca.equals(cb)


def test_a_sigkilled_process_resumes_to_the_same_outputs(tmp_path, model, corpus):
    """A real `memclean clean` process killed with SIGKILL mid-scoring, then started again."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    data, _ = corpus
    memclean = str(Path(sys.executable).with_name("memclean"))
    args = ["clean", "--data", str(data), "--model", str(model), "--max-pixels", "50000",
            "--solver", "euler", "--steps", "300", "--batch-size", "2", "--shard-size", "2", "--precision-target", "0"]
    cache = tmp_path / "kill-cache"
    proc = subprocess.Popen([memclean, *args, "--out", str(tmp_path / "out"), "--cache-dir", str(cache)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: a loaded CI machine starts torch slowly
    while time.time() < deadline and proc.poll() is None and len(list(cache.rglob("*.parquet"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    assert len(list(cache.rglob("*.parquet"))) >= 2, "no batch finished before the deadline"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()  # nothing half-written at the final path
    assert main([*args, "--out", str(tmp_path / "out"), "--cache-dir", str(cache)]) == 0
    assert not list(tmp_path.glob(".out.tmp-*"))  # the dead run's staging folder was cleared
    assert main([*args, "--out", str(tmp_path / "ref"), "--no-cache"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["scoring"]["reused"] >= 2
    cols = ["id", "status", "flagged", "action", "dup_of"]
    assert pq.read_table(tmp_path / "out" / "scores.parquet", columns=cols).equals(
        pq.read_table(tmp_path / "ref" / "scores.parquet", columns=cols))
    # the resumed scores came from another process, whose torch may use another thread count:
    # float32 sums in another order, within 64 * 2^-23 of |V| (as tests/test_volume.py's bound)
    for name in ("log_volume_growth", "logp"):
        a, b = (pq.read_table(tmp_path / o / "scores.parquet").column(name).to_pylist() for o in ("out", "ref"))
        assert all((x is None and y is None) or x == pytest.approx(y, rel=64 * 2.0**-23) for x, y in zip(a, b))


def test_an_input_that_changes_during_the_run_is_rejected_and_every_vector_stays_with_its_image(
        tmp_path, model, corpus, monkeypatch):
    """The file rand03.png is rewritten between scoring and writing: it becomes a rejected row
    (changed_during_run), and embeddings.parquet pairs every remaining id with the vector of
    its own image (the rows after the changed one once got their neighbour's)."""
    import pipeline.run.lifecycle
    from pipeline.io.data import ImageSpec, decode_image
    from pipeline.decide.embeddings import make_embedder
    from pipeline.score.models import load_model

    data, _ = corpus
    real = pipeline.run.lifecycle.write_cleaned

    def rewrite_then_write(*args):
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(data / "rand03.png")
        return real(*args)

    monkeypatch.setattr(pipeline.run.lifecycle, "write_cleaned", rewrite_then_write)
    assert run(tmp_path, model, data, "--no-cache", "--action", "none") == 0
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()}
    assert rows["rand03.png"]["status"] == "rejected" and rows["rand03.png"]["reject_reason"] == "changed_during_run"
    assert rows["rand03.png"]["action"] == "rejected"
    emb = pq.read_table(tmp_path / "out" / "embeddings.parquet").to_pylist()
    ids = [r["id"] for r in emb]
    assert "rand03.png" not in ids and "rand04.png" in ids
    assert set(ids) == {i for i, r in rows.items() if r["status"] == "ok"}
    embedder = make_embedder("pixel", load_model(model))
    spec = ImageSpec(3, (8, 8), max_pixels=50000)
    for r in emb:
        raw = open(rows[r["id"]]["path_bytes"], "rb").read()  # the exact path (names may not be UTF-8)
        expected = embedder(decode_image(raw, spec)[None]).numpy()[0]
        # a unit vector from float32 resampling and blurring, computed in another batch: rounding
        # of a few dozen accumulated terms, 64 * 2^-23 of its norm; a neighbour's vector is ~1 away
        assert np.allclose(r["embedding"], expected, atol=64 * 2.0**-23), r["id"]


def test_a_keeper_that_changes_before_writing_hands_its_cluster_to_the_next_member(tmp_path, model, monkeypatch):
    """Four files of one picture (a duplicate cluster) and six others; the cluster's keeper is
    rewritten between scoring and writing. It ends rejected (changed_during_run), out of its
    cluster and out of flagged.parquet; its lowest-risk copy becomes the keeper (kept, in
    cleaned/) and the other copies name it: the picture stays in the dataset."""
    import pipeline.run.lifecycle

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    for k in range(4):
        Image.fromarray(picture).save(data / f"copy{k}.png")
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(data / f"other{i}.png")
    real, seen = pipeline.run.lifecycle.write_cleaned, {}

    def rewrite_keeper_then_write(folder, source, decided, *rest):
        rows = decided.select(["id", "dup_cluster", "dup_of"]).to_pylist()
        (keeper,) = [r["id"] for r in rows if r["dup_cluster"] is not None and r["dup_of"] is None]
        seen["keeper"] = keeper
        Image.fromarray(255 - picture).save(data / keeper)
        return real(folder, source, decided, *rest)

    monkeypatch.setattr(pipeline.run.lifecycle, "write_cleaned", rewrite_keeper_then_write)
    # every image flagged (quantile 0.01 of 10 scores), on failure kept: the copies' fate is the keeper's
    assert run(tmp_path, model, data, "--no-cache", "--action", "dedup", "--flag-quantile", "0.01") == 0
    out = tmp_path / "out"
    rows = {r["id"]: r for r in pq.read_table(out / "scores.parquet").to_pylist()}
    old = seen["keeper"]
    assert rows[old]["status"] == "rejected" and rows[old]["reject_reason"] == "changed_during_run"
    assert rows[old]["action"] == "rejected" and rows[old]["flagged"] is None and rows[old]["dup_cluster"] is None
    copies = sorted(i for i in rows if i.startswith("copy") and i != old)
    keepers = [i for i in copies if rows[i]["dup_of"] is None]
    assert len(keepers) == 1 and rows[keepers[0]]["action"] == "kept"
    new = keepers[0]
    risk = json.loads((out / "manifest.json").read_text())["threshold"]["score"]  # the judged score is the risk
    assert new == min(copies, key=lambda i: (rows[i][risk], i))  # the lowest-risk member
    assert "changed during the run" in rows[new]["action_reason"]
    for i in copies:
        assert rows[i]["dup_cluster"] == rows[new]["dup_cluster"] is not None
        if i != new:
            assert rows[i]["dup_of"] == new and rows[i]["action"] == "dropped" and new in rows[i]["action_reason"]
    cleaned = {r["id"]: r for r in pq.read_table(out / "cleaned").to_pylist()}
    assert new in cleaned and old not in cleaned and cleaned[new]["image"]["bytes"] == (data / new).read_bytes()
    flagged = pq.read_table(out / "flagged.parquet").column("id").to_pylist()
    assert old not in flagged and new in flagged
    c = json.loads((out / "manifest.json").read_text())["counts"]
    assert c["input"] == 10 == c["kept"] + c["augmented"] + c["dropped"] + c["rejected"] and c["rejected"] == 1
    assert c["kept"] == len(cleaned) == 7  # six others and the picture, once


@pytest.mark.parametrize("embedder", ["pixel", "unet"])
def test_a_clean_run_on_a_latent_checkpoint(tmp_path, write_images, embedder):
    """The whole run on an LDM-style pipeline: scored in its latent, flagged, deduplicated on
    pixels (or on the UNet's features of the latent), augmented and re-scored through the
    encoder, with the outputs of the pixel case."""
    from tests.exact import save_latent_pipeline

    model = save_latent_pipeline(tmp_path / "ldm", "vq")
    data = write_images(n=10, size=(16, 16), mode="RGB")
    Image.open(data / "img000.png").save(data / "copy.png")
    assert main(["clean", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "out"),
                 "--solver", "euler", "--steps", "2", "--flag-quantile", "0.5", "--accept-band", "0", "--precision-target", "0",
                 "--no-cache", "--embedder", embedder, "--max-loss-fraction", "1"]) == 0  # a tiny UNet's features join all
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["score_space"] == "latent" and m["model"]["autoencoder"] == "VQModel"
    assert m["counts"]["input"] == 11 == m["counts"]["kept"] + m["counts"]["augmented"] + m["counts"]["dropped"]
    rows = {r["id"]: r for r in pq.read_table(out / "scores.parquet").to_pylist()}
    assert rows["copy.png"]["dup_cluster"] == rows["img000.png"]["dup_cluster"] is not None
    assert all(r["score_space"] == "latent" for r in rows.values())
    assert m["counts"]["augmented"] + sum(r["action"] == "dropped" and r["flagged"] for r in rows.values()) > 0
    for name in ("cleaned", "flagged.parquet", "embeddings.parquet", "report.html"):
        assert (out / name).exists()


def test_a_full_disk_or_an_unwritable_folder_fails_clearly_and_keeps_the_previous_output(
        tmp_path, model, corpus, monkeypatch, capsys):
    """ENOSPC while writing the tables, or an output folder that cannot be written: the run fails
    with an error that says so, leaves no staging folder, and the previous complete output
    stays as it was."""
    import errno
    import os

    import pipeline.io.store as store

    data, _ = corpus
    assert run(tmp_path, model, data, "--no-cache") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    real = store.AtomicParquetWriter.write_table

    def disk_full(self, table):
        if self.path.name == "scores.parquet":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, table)

    monkeypatch.setattr(store.AtomicParquetWriter, "write_table", disk_full)
    assert run(tmp_path, model, data, "--no-cache", "--overwrite") == 1
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.setattr(store.AtomicParquetWriter, "write_table", real)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    assert run(tmp_path, model, data, "--no-cache", "--overwrite") == 1
    assert "not writable" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_two_runs_on_one_output_one_finishes_the_other_fails_clearly(tmp_path, model, corpus, capsys):
    import subprocess
    import sys
    import time
    from pathlib import Path

    data, _ = corpus
    memclean = str(Path(sys.executable).with_name("memclean"))
    args = ["clean", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "out"),
            "--max-pixels", "50000", "--solver", "euler", "--steps", "200", "--batch-size", "2", "--no-cache",
            "--precision-target", "0"]
    first = subprocess.Popen([memclean, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / ".out.lock"
    deadline = time.time() + 300
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()) and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started"
    assert main(args) == 2
    assert f"another memclean run (pid {first.pid})" in capsys.readouterr().err
    assert first.wait(timeout=600) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    c = m["counts"]
    assert (tmp_path / "out" / COMPLETE_MARKER).is_file() and c["input"] == c["kept"] + c["dropped"] + c["augmented"] + c["rejected"]


@pytest.mark.parametrize("score", ["calibrated_volume_growth", "combined_score"])
def test_a_calibrated_score_is_fitted_on_the_reference_and_judged_everywhere(tmp_path, model, corpus, score):
    """With --reference the complexity trend is fitted on the held-out images by least squares;
    the threshold is the reference's 0.95 quantile of the judged score, which both score tables
    carry with every other derived score and its standard error; flag_uncertain marks the rows
    within 2 standard errors of the threshold, and the manifest holds the fit."""
    data, _ = corpus
    held = tmp_path / "held"
    held.mkdir()
    rng = np.random.default_rng(7)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(held / f"h{i:02d}.png")
    Image.new("RGB", (10, 12), (90, 90, 90)).save(held / "plain.png")  # complexity must vary
    assert run(tmp_path, model, data, "--reference", str(held), "--flag-fpr", "0.05", "--score", score,
               "--action", "none") == 0
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    t = m["threshold"]
    cal = t["details"]["calibration"]
    assert t["score"] == score and cal["fitted_on"] == "reference" and cal["method"] == "least_squares"
    assert cal["fits"]["log_volume_growth"]["n"] == 13
    ref = pq.read_table(out / "reference_scores.parquet").to_pylist()
    ref_scores = [r[score] for r in ref if r["status"] == "ok"]
    assert t["value"] == pytest.approx(np.quantile(ref_scores, 0.95))
    rows = [r for r in pq.read_table(out / "scores.parquet").to_pylist() if r["status"] == "ok"]
    fit = cal["fits"]["log_volume_growth"]
    for r in rows:
        assert r["calibrated_volume_growth"] == pytest.approx(
            r["log_volume_growth"] - fit["intercept"] - fit["slope"] * r["complexity"], rel=1e-9, abs=1e-9)
        assert r["flagged"] == (r[score] > t["value"])
        assert r["flag_uncertain"] == (abs(r[score] - t["value"]) <= 2 * r[f"{score}_se"])
        assert r["complexity"] > 0 and r["denoising_loss"] > 0 and r["log_volume_growth_se"] >= 0


def test_precision_passes_average_independent_seeds(tmp_path, model, corpus):
    """A tiny random UNet ranks images mostly by probe noise, so the noise ratio stays above the
    target and the run takes --max-passes 2 passes: each row's V, window and loss are the mean of
    what one-pass runs with seeds 0 and 1 give (the same numbers: probes and noises are a hash of
    the seed and the image), their standard errors those of a mean of two, nfe their sum."""
    data, _ = corpus
    one = []
    for seed in (0, 1):
        assert run(tmp_path, model, data, "--no-cache", "--seed", str(seed), "--overwrite") == 0
        one.append({r["id"]: r for r in pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()})
    assert run(tmp_path, model, data, "--no-cache", "--overwrite", "--precision-target", "0.01",
               "--max-passes", "2") == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    p = m["scoring"]["precision"]
    assert p["passes"] == 2 and len(p["noise_ratio_after_each"]) == 2 and p["noise_ratio_after_each"][0] > 0.01
    assert {"score", "score_input_pass2"} <= set(m["timings_s"])
    both = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()}
    for i, r in both.items():
        if r["status"] != "ok":
            continue
        a, b = one[0][i], one[1][i]
        assert r["passes"] == 2 and r["nfe"] == a["nfe"] + b["nfe"] and r["seed"] == 0
        for c in ("log_volume_growth", "window_volume_growth", "denoising_loss"):  # float64 sums of two
            assert r[c] == pytest.approx((a[c] + b[c]) / 2, rel=1e-12), c
        assert r["log_volume_growth_se"] == pytest.approx(math.hypot(a["log_volume_growth_se"],
                                                                     b["log_volume_growth_se"]) / 2, rel=1e-12)
