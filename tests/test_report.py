"""report.html rendered in a real headless Chromium: not blank, every image loads, nothing external."""
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
                 "--on-failure", "keep"]) == 0
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


def test_gallery_counts_and_order(report):
    import pyarrow.parquet as pq

    html = (report / "report.html").read_text()
    rows = pq.read_table(report / "scores.parquet").to_pylist()
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: (-r["log_volume_growth"], r["id"]))
    expected, seen = [], set()  # one card per duplicate cluster: its highest-scoring flagged member
    for r in flagged:
        if r["dup_cluster"] is None or r["dup_cluster"] not in seen:
            expected.append(r["id"])
            seen.add(r["dup_cluster"])
    gallery = html.split("id='flagged'>")[1].split("</div>\n<h2>")[0]
    shown = re.findall(r'alt="([^"]+)"', gallery)
    assert shown == expected[:60]
    flagged_clusters = [r["dup_cluster"] for r in flagged if r["dup_cluster"] is not None]
    assert len(flagged_clusters) > len(set(flagged_clusters))  # the fixture has flagged copies to fold
    assert gallery.count("flagged copies</b>") == sum(flagged_clusters.count(k) > 1 for k in set(flagged_clusters))
    clusters = {r["dup_cluster"] for r in rows if r["dup_cluster"] is not None}
    assert html.count("class='row cluster'") == min(len(clusters), 30) >= 4
    augmented = [r for r in rows if r["action"] == "augmented"]
    assert html.count("class='row pair'") == len(augmented)


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
    top = sorted(listed, key=lambda r: (-r["log_volume_growth"], r["id"]))[:3]
    assert re.findall(r"<tr><td>([^<]+)</td>", table) == [r["id"] for r in top]
    assert f"The first 3 of {len(listed)} rows" in html


def test_scan_scores_reads_rows_and_ok_scores_in_one_pass(tmp_path):
    """scan_scores keeps only the showable rows and returns exactly the ok rows' scores, in
    order, across row groups; without a score it returns no scores."""
    import numpy as np
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
