"""report.html rendered in a real headless Chromium: not blank, every image loads, nothing external."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from diffusers import DDPMScheduler
from PIL import Image

from memclean.cli import main
from pipeline.io.report import histogram_svg
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet
from tests.planted import planted_set

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser():
    if CHROMIUM is None:
        if os.environ.get("MEMCLEAN_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (MEMCLEAN_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium); CI installs it")
    return CHROMIUM


def chromium(tmp_path, *args):
    r = subprocess.run([browser(), *FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}",
                        "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=120)
    return r.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    planted_set(root / "train", n_unique=30, n_groups=4)
    planted_set(root / "heldout", n_unique=30, n_groups=0, seed=1)
    model = save_checkpoint(tiny_unet(channels=3, size=8), DDPMScheduler(), root / "model")
    assert main(["clean", "--data", str(root / "train"), "--reference", str(root / "heldout"), "--flag-fpr", "0.3",
                 "--model", str(model), "--out", str(root / "out"), "--solver", "euler", "--steps", "2",
                 "--on-failure", "keep", "--precision-target", "0"]) == 0
    return root / "out"


def body_attrs(dom: str) -> dict:
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


def test_report_renders_with_every_image(report, tmp_path):
    html = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from the network
    n_img = html.count("<img ")
    assert n_img > 0
    attrs = body_attrs(chromium(tmp_path, "--dump-dom", (report / "report.html").as_uri()))
    assert attrs["images"] == attrs["images-loaded"] == str(n_img)
    assert attrs["failed-resources"] == "0"
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", (report / "report.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # not blank: text, images, plot


def hand_made_output(folder):
    """An output folder written by hand: eight rows whose gallery, clusters and pairs are counted
    below without the report's code. Flagged: f1 (9) and its copy f2 (8) in cluster 0, f3 (7)
    alone, f4 (6) and f5 (5) in cluster 1 with the unflagged f6 (4); k1 (1) kept, a1 (0.5)
    augmented; a rejected row r1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("f1", 9.0, True, 0, None, "kept"), ("f2", 8.0, True, 0, "f1", "dropped"),
            ("f3", 7.0, True, None, None, "dropped"), ("f4", 6.0, True, 1, "f6", "dropped"),
            ("f5", 5.0, True, 1, "f6", "dropped"), ("f6", 4.0, False, 1, None, "kept"),
            ("k1", 1.0, False, None, None, "kept"), ("a1", 0.5, True, None, None, "augmented"),
            ("r1", None, None, None, None, "rejected")]
    keys = ("id", "log_volume_growth", "flagged", "dup_cluster", "dup_of", "action")
    cols = {k: [r[i] for r in rows] for i, k in enumerate(keys)}
    n = len(rows)
    cols.update(status=["rejected" if a == "rejected" else "ok" for a in cols["action"]],
                flag_reason=["why" if f else None for f in cols["flagged"]], action_reason=[None] * n,
                dup_similarity=[0.99 if k is not None else None for k in cols["dup_cluster"]],
                augment_preset=["light" if a == "augmented" else None for a in cols["action"]],
                augmented_score=[0.2 if a == "augmented" else None for a in cols["action"]])
    types = {"dup_cluster": pa.int64(), "dup_similarity": pa.float32(), "log_volume_growth": pa.float64(),
             "augmented_score": pa.float64(), "flagged": pa.bool_()}
    folder.mkdir()
    pq.write_table(pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()}),
                   folder / "scores.parquet")
    threshold = {"value": 4.5, "policy": "absolute", "parameters": {"value": 4.5}, "details": {},
                 "score": "log_volume_growth", "realised_flag_rate": 6 / 8}
    manifest = {"counts": {"input": 9, "flagged": 6, "kept": 3, "augmented": 1, "dropped": 4, "rejected": 1},
                "threshold": threshold, "dedup": {"clusters": 2}, "data": {"path": "d"}, "out": str(folder),
                "model": {}, "settings": {}, "versions": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_gallery_counts_and_order(tmp_path, monkeypatch):
    """The gallery shows one card per duplicate cluster (its highest-scoring flagged member),
    highest score first, and counts the flagged copies it folds; every cluster is a row (keeper
    first); every augmented image a pair. Expected answers counted by hand from the fixture."""
    import pipeline.io.report as report_module

    out = hand_made_output(tmp_path / "out")

    def gallery() -> tuple[str, list[str]]:
        html = report_module.write_report(out).read_text()
        part = html.split("id='flagged'>")[1].split("</div>\n<h2>")[0]
        return html, re.findall(r'alt="([^"]+)"', part)

    html, shown = gallery()
    assert shown == ["f1", "f3", "f4", "a1"]  # f2 folds into f1's card, f5 into f4's
    assert html.split("id='flagged'>")[1].split("</div>\n<h2>")[0].count("+1 flagged copies</b>") == 2
    assert html.count("class='row cluster'") == 2 and html.count("class='row pair'") == 1
    rows = re.findall(r"data-cluster='(\d+)'>(.*?)(?=<div class='row cluster'|<h2>)", html, re.S)
    assert [(k, re.findall(r'alt="([^"]+)"', part)) for k, part in rows] == \
        [("1", ["f6", "f4", "f5"]), ("0", ["f1", "f2"])]  # the largest first; in each, the keeper first, then by id
    monkeypatch.setattr(report_module, "TOP_FLAGGED", 2)
    assert gallery()[1] == ["f1", "f3"]


def test_a_missing_image_is_caught(report, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(report, copy)
    victim = sorted((copy / "report").iterdir())[0]
    victim.unlink()
    attrs = body_attrs(chromium(tmp_path, "--dump-dom", (copy / "report.html").as_uri()))
    assert int(attrs["images-loaded"]) < int(attrs["images"]) and attrs["failed-resources"] != "0"


def test_report_command_rebuilds_and_histogram_marks_the_threshold(report, tmp_path, capsys):
    copy = tmp_path / "out"
    shutil.copytree(report, copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").read_text() == (report / "report.html").read_text()
    svg = histogram_svg(np.array([1.0, 2, 3]), np.array([0.5, 1.5]), 2.5, "score")
    assert "threshold 2.5" in svg and "threshold 10399.8" in histogram_svg(np.array([9e3, 1.1e4]), None, 10399.8, "s") and "held-out reference" in svg


def test_report_command_makes_thumbnails_an_older_output_lacks(report, tmp_path, capsys):
    """`memclean report` on an output whose report/ lacks a shown image (written by a memclean
    that showed other rows) makes it from the source file, so the rebuilt page is whole."""
    copy = tmp_path / "older"
    shutil.copytree(report, copy)
    shown = re.findall(r'<img src="report/([^"]+)" alt="([^"]+)"', (report / "report.html").read_text())
    victims = sorted({name for name, alt in shown if not alt.startswith("augmented ")})[:3]
    for v in victims:
        (copy / "report" / v).unlink()
    assert main(["report", str(copy)]) == 0
    assert "made 3 missing thumbnails" in capsys.readouterr().out
    for v in victims:  # the same pixels the run's own thumbnail had
        assert (copy / "report" / v).read_bytes() == (report / "report" / v).read_bytes()


def test_the_table_lists_the_highest_scores_first_up_to_its_cap(report, tmp_path, monkeypatch):
    """The report turns only flagged, clustered and augmented rows into Python objects (not
    every input); the table of them is capped, highest score first, and says where the rest are."""
    import pyarrow.parquet as pq

    from pipeline.io import report as report_module

    everything = pq.read_table(report / "scores.parquet")
    rows = report_module.report_rows(everything)
    assert {r["id"] for r in rows} == {r["id"] for r in everything.to_pylist()
                                       if r["flagged"] or r["dup_cluster"] is not None or r["dup_of"] is not None
                                       or r["action"] == "augmented"}
    out = tmp_path / "out"
    shutil.copytree(report, out)
    monkeypatch.setattr(report_module, "TABLE_ROWS", 3)
    html = report_module.write_report(out).read_text()
    table = html.split("<h2>Flagged and duplicated rows</h2>")[1].split("</table>")[0]
    listed = [r for r in rows if r["flagged"] or r["dup_cluster"] is not None]
    score = json.loads((report / "manifest.json").read_text())["threshold"]["score"]
    top = sorted(listed, key=lambda r: (-r[score], r["id"]))[:3]
    assert re.findall(r"<tr><td>([^<]+)</td>", table) == [r["id"] for r in top]
    assert f"The first 3 of {len(listed)} rows" in html


def test_scan_scores_reads_rows_and_ok_scores_in_one_pass(tmp_path):
    """scan_scores keeps only the showable rows and returns exactly the ok rows' scores, in
    order, across row groups; without a score it returns no scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io.report import scan_scores

    t = pa.table({"id": ["a", "b", "c", "d", "e"], "status": ["ok", "rejected", "ok", "ok", "ok"],
                  "flagged": [True, None, False, False, None], "dup_cluster": pa.array([None, None, 0, None, None], pa.int64()),
                  "dup_of": [None, None, None, None, None], "action": ["kept", "rejected", "kept", "kept", "augmented"],
                  "log_volume_growth": [1.5, None, 2.5, 3.5, 4.5]})
    pq.write_table(t, tmp_path / "scores.parquet", row_group_size=2)
    cols = ["id", "status", "flagged", "dup_cluster", "dup_of", "action", "log_volume_growth"]
    rows, ok = scan_scores(tmp_path / "scores.parquet", cols, "log_volume_growth")
    assert [r["id"] for r in rows] == ["a", "c", "e"]  # flagged, clustered, augmented
    assert ok.tolist() == [1.5, 2.5, 3.5, 4.5]
    assert scan_scores(tmp_path / "scores.parquet", cols)[1] is None
