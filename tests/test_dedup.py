"""`memclean dedup`: the duplicate search alone (no model), through the command line."""
import json

import pyarrow.parquet as pq
import pytest
from diffusers import DDPMScheduler

from memclean.cli import main
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet
from tests.planted import planted_set


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    """A planted set (5 groups of exact and near copies among 40 unique scenes) and a bad file."""
    root = tmp_path_factory.mktemp("dd")
    truth = planted_set(root / "train", n_unique=40, n_groups=5)
    (root / "train" / "broken.png").write_bytes(b"\x89PNG not really")
    return root, truth


def dedup(root, out, *extra, data="train"):
    rc = main(["dedup", "--data", str(root / data), "--out", str(root / out), "--overwrite", *extra])
    assert rc == 0
    rows = {r["id"]: r for r in pq.read_table(root / out / "scores.parquet").to_pylist()}
    return rows, json.loads((root / out / "manifest.json").read_text())


def partition(rows, ids):
    """The clusters as a set of frozensets of ids (numbering-free)."""
    groups = {}
    for i in ids:
        if rows[i]["dup_cluster"] is not None:
            groups.setdefault(rows[i]["dup_cluster"], set()).add(i)
    return {frozenset(g) for g in groups.values()}


def test_clusters_keepers_outputs_and_accounting(drop):
    root, truth = drop
    rows, m = dedup(root, "out")
    assert m["kind"] == "dedup" and m["model"] is None
    assert rows["broken.png"]["action"] == "rejected" and rows["broken.png"]["reject_reason"]
    for g in range(5):
        members = sorted(i for i in truth if truth[i] == g)
        assert len({rows[i]["dup_cluster"] for i in members}) == 1 and rows[members[0]]["dup_cluster"] is not None
        # no scores: the keeper is the first member by id, the others are dropped pointing at it
        assert rows[members[0]]["action"] == "kept" and rows[members[0]]["dup_of"] is None
        assert all(rows[i]["action"] == "dropped" and rows[i]["dup_of"] == members[0] for i in members[1:])
    assert sum(rows[i]["dup_cluster"] is not None for i in truth if truth[i] == -1) <= 2
    c = m["counts"]
    assert c["input"] == len(truth) + 1 == c["kept"] + c["dropped"] + c["rejected"]
    assert all(r["log_volume_growth"] is None and not r["flagged"] for r in rows.values())
    cleaned = pq.read_table(root / "out" / "cleaned").to_pylist()
    assert sorted(r["id"] for r in cleaned) == sorted(i for i, r in rows.items() if r["action"] == "kept")
    kept_bytes = {r["id"]: r["image"]["bytes"] for r in cleaned}
    assert all(kept_bytes[i] == (root / "train" / i).read_bytes() for i in kept_bytes)  # bytes as given
    emb = pq.read_table(root / "out" / "embeddings.parquet")
    assert sorted(emb.column("id").to_pylist()) == sorted(i for i, r in rows.items() if r["action"] != "rejected")
    assert (root / "out" / "index.faiss").is_file() and (root / "out" / "_COMPLETE").is_file()
    # timed and measured as every verb is (run/staged.py): the same keys as a clean run's manifest
    stages = ["embed", "dedup", "write_cleaned", "write_tables", "report"]
    assert set(m["timings_s"]) == set(m["peak_rss_mb"]) == set(stages)
    assert set(m["held_mb"]) <= set(stages)
    page = (root / "out" / "report.html").read_text()
    assert "Duplicate clusters" in page and "Top flagged" not in page and "<h2>Scores" not in page
    assert main(["report", str(root / "out")]) == 0  # a dedup output's report rebuilds


def test_the_same_clusters_as_a_clean_run(drop, tmp_path):
    """Same embedder and image side: memclean dedup and memclean clean cluster alike (their
    keepers may differ: clean keeps the lowest-risk member)."""
    root, truth = drop
    model = save_checkpoint(tiny_unet(channels=3, size=16), DDPMScheduler(), tmp_path / "model")
    assert main(["clean", "--data", str(root / "train"), "--model", str(model), "--out", str(tmp_path / "clean"),
                 "--solver", "euler", "--steps", "2", "--action", "dedup", "--precision-target", "0"]) == 0
    clean = {r["id"]: r for r in pq.read_table(tmp_path / "clean" / "scores.parquet").to_pylist()}
    rows, _ = dedup(root, "side16", "--image-size", "16")
    assert partition(rows, truth) == partition(clean, truth)


def test_against_an_earlier_output_and_refusals(drop, capsys):
    root, truth = drop
    dedup(root, "first")
    rows, m = dedup(root, "second", "--against", str(root / "first"))
    # the same drop again: every decodable image duplicates a kept image of the first output
    assert m["data"] == {"path": str(root / "train"), "kind": "folder", "skipped_files": {}}
    assert m["counts"]["kept"] == 0 and all(r["dup_of"] for r in rows.values() if r["status"] == "ok")
    assert any(r["dup_of"].startswith(str(root / "first") + ":") for r in rows.values() if r["dup_of"])
    out = root / "third"
    assert main(["dedup", "--data", str(root / "train"), "--out", str(out), "--embedder", "unet"]) == 2
    assert "no model" in capsys.readouterr().err and not out.exists()
    assert main(["dedup", "--data", str(root / "train"), "--out", str(root / "first")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["dedup", "--data", str(root / "train"), "--out", str(out), "--image-size", "4"]) == 2
    assert not out.exists()


def test_a_catalog_that_grows_mid_run_is_read_once(drop, tmp_path, monkeypatch):
    """--against a catalog is resolved when the run starts: a part accepted while it embeds (a
    concurrent drop) is in none of its steps: not in the earlier survivors, not in the losses,
    not in the manifest's against_outputs."""
    import pipeline.run.dedup as dedup_run

    root, _ = drop
    first, late = dedup(root, "cat-first")[1]["out"], dedup(root, "cat-late")[1]["out"]
    catalog = tmp_path / "dataset.json"
    catalog.write_text(json.dumps({"parts": [{"drop": "first", "out": first}]}))
    embed = dedup_run.embed_source

    def embed_then_grow(*args, **kwargs):
        catalog.write_text(json.dumps({"parts": [{"drop": "first", "out": first}, {"drop": "late", "out": late}]}))
        return embed(*args, **kwargs)
    monkeypatch.setattr(dedup_run, "embed_source", embed_then_grow)
    rows, m = dedup(root, "cat-second", "--against", str(catalog))
    assert m["dedup"]["against"] == str(catalog) and m["dedup"]["against_outputs"] == [first]
    assert not any((r["dup_of"] or "").startswith(late + ":") for r in rows.values())
    earlier = [r for r in rows.values() if (r["dup_of"] or "").startswith(first + ":")]
    assert earlier
    assert m["losses"]["in_earlier_output"] == sum(r["action"] == "dropped" for r in earlier)


def test_a_run_that_would_empty_the_dataset_is_refused_and_its_plan_set_aside(drop, tmp_path, capsys):
    """At --dup-threshold -1 every image joins one cluster: the run would remove all but one
    picture. It fails (exit 2) saying how many and why, commits nothing, and leaves its plan
    (scores, flags, report, manifest with the refusal; no dataset, no _COMPLETE) in OUT.plan;
    a rerun that accepts it commits and removes the stale plan."""
    root, truth = drop
    out = tmp_path / "out"
    rc = main(["dedup", "--data", str(root / "train"), "--out", str(out), "--dup-threshold", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "would remove" in err and "joined as near duplicates" in err and str(out) + ".plan" in err
    assert not out.exists()
    plan = tmp_path / "out.plan"
    assert {p.name for p in plan.iterdir()} >= {"scores.parquet", "manifest.json", "report.html"}
    assert not (plan / "cleaned").exists() and not (plan / "_COMPLETE").exists()
    m = json.loads((plan / "manifest.json").read_text())
    assert m["refused"].startswith("this run would remove") and m["losses"]["removed"] >= len(truth) - 5
    assert main(["dedup", "--data", str(root / "train"), "--out", str(out), "--dup-threshold", "-1",
                 "--max-loss-fraction", "1"]) == 0
    assert (out / "_COMPLETE").is_file() and not plan.exists()
    assert json.loads((out / "manifest.json").read_text())["refused"] is None


def test_colour_twins_stay_apart_and_brighter_copies_join(tmp_path):
    """Issue 39 through the command line: `memclean dedup` (which decodes RGB) embeds with the
    colour check (pixel+colour in the manifest); a scene's hue-turned twin (the same grey
    layout) stays out of its cluster while its +12% brightness copy joins it. The same pictures
    saved grey take the grey path: the twin, grey, is a copy again."""
    import numpy as np
    from PIL import Image, ImageEnhance

    from tests.planted import scene

    rng = np.random.default_rng(11)
    pictures = {f"u{k:02d}.png": scene(rng) for k in range(12)}
    img = scene(rng)
    h, s, v = img.convert("HSV").split()
    pictures["a.png"] = img
    pictures["a_twin.png"] = Image.merge("HSV", (h.point(lambda p: (p + 85) % 256), s, v)).convert("RGB")
    pictures["a_bright.png"] = ImageEnhance.Brightness(img).enhance(1.12)
    clusters = {}
    for mode in ("RGB", "L"):
        folder, out = tmp_path / mode, tmp_path / f"out{mode}"
        folder.mkdir()
        for name, picture in pictures.items():
            picture.convert(mode).save(folder / name)
        assert main(["dedup", "--data", str(folder), "--out", str(out), "--image-size", "64"]) == 0
        m = json.loads((out / "manifest.json").read_text())
        rows = pq.read_table(out / "scores.parquet", columns=["id", "dup_cluster"]).to_pylist()
        clusters[mode] = (m["dedup"]["embedder"], {r["id"]: r["dup_cluster"] for r in rows})
    name, c = clusters["RGB"]
    assert name == "pixel+colour"
    assert c["a.png"] is not None and c["a_bright.png"] == c["a.png"] and c["a_twin.png"] != c["a.png"]
    _, c = clusters["L"]
    assert c["a.png"] is not None and c["a_twin.png"] == c["a.png"] == c["a_bright.png"]
