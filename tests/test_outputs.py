"""The files of a run: cleaned/ holds exactly the kept and augmented images, flagged.parquet
the flagged rows, embeddings.parquet each vector with its own image; earlier outputs checked."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.data import discover
from pipeline.io.outputs import (EMBEDDINGS, ImageSpool, check_against, earlier_survivors, write_embeddings,
                                 write_cleaned, write_flagged, write_tables)
from pipeline.io.store import OutputSettings, read_metadata


def table_for(data, actions, flagged=None):
    ids = sorted(p.name for p in data.iterdir())
    n = len(ids)
    return pa.table({"id": ids, "status": ["ok"] * n, "sha256": [hashlib.sha256((data / i).read_bytes()).hexdigest() for i in ids],
                     "action": actions, "log_volume_growth": [float(k) for k in range(n)],
                     "augmented_png": pa.array([None] * n, pa.string()),
                     "augmented_score": pa.array([None] * n, pa.float64()),
                     "augmented_volume_growth": pa.array([None] * n, pa.float64()), "flagged": flagged or [False] * n})


def test_cleaned_holds_the_kept_images_and_hands_changed_ones_to_reconcile(tmp_path, write_images):
    """One pass writes the kept rows (shard_rows 1: a file each, named once their count is
    known) and spools the flagged ones; a changed input goes to `reconcile`, and the row it
    turns kept is read in a second pass."""
    data = write_images(n=5, size=(8, 8))
    decided = table_for(data, ["kept", "dropped", "kept", "kept", "dropped"], flagged=[False, True, False, False, True])
    (data / "img002.png").write_bytes(b"changed since scoring")
    (data / "img003.png").unlink()  # gone from the source: changed as well
    calls = []

    def reconcile(table, changed):
        calls.append(set(changed))  # a stand-in for remediate.reject_changed: img001 takes img002's place
        action = ["rejected" if i in changed else ("kept" if i == "img001.png" else a)
                  for i, a in zip(table.column("id").to_pylist(), table.column("action").to_pylist())]
        return table.set_column(table.schema.get_field_index("action"), "action", pa.array(action))

    spool = ImageSpool(tmp_path / "spool.arrow")
    decided, written = write_cleaned(tmp_path / "cleaned", discover(data), decided, "log_volume_growth",
                                    OutputSettings(out="x", shard_rows=1), reconcile, spool)
    assert calls == [{"img002.png", "img003.png"}]  # the second pass found nothing more
    rows = pq.read_table(tmp_path / "cleaned").to_pylist()
    assert sorted(r["id"] for r in rows) == ["img000.png", "img001.png"]
    assert all(r["image"]["bytes"] == (data / r["id"]).read_bytes() for r in rows)
    assert written == sum(len((data / i).read_bytes()) for i in ("img000.png", "img001.png"))
    assert sorted(p.name for p in (tmp_path / "cleaned").iterdir()) == ["train-00000-of-00002.parquet",
                                                                         "train-00001-of-00002.parquet"]
    assert sorted(spool.rows) == ["img001.png", "img004.png"]  # the flagged rows, read in the same pass
    assert decided.column("action").to_pylist() == ["kept", "kept", "rejected", "rejected", "dropped"]


def test_flagged_rows_carry_their_images_highest_score_first_in_small_row_groups(tmp_path, write_images):
    data = write_images(n=5, size=(8, 8))
    decided = table_for(data, ["kept", "augmented", "dropped", "kept", "kept"], flagged=[True, True, True, False, True])
    png = tmp_path / "variant.png"
    png.write_bytes(b"\x89PNG variant")
    decided = decided.set_column(decided.schema.get_field_index("augmented_png"), "augmented_png",
                                 pa.array([None, str(png), None, None, None], pa.string()))
    spool = ImageSpool(tmp_path / ".flagged-images.arrow")
    for i in ("img000.png", "img001.png", "img002.png"):  # img004 is flagged but was not spooled
        spool.add(i, (data / i).read_bytes(), i)
    written = write_flagged(tmp_path, spool, decided, "log_volume_growth", {"k": 1}, row_group_rows=2)
    t = pq.read_table(tmp_path / "flagged.parquet")
    rows = t.to_pylist()
    assert [r["id"] for r in rows] == ["img004.png", "img002.png", "img001.png", "img000.png"]  # score 4, 2, 1, 0
    assert rows[0]["image"] is None  # no bytes for it: no image rather than another one
    for r in rows[1:]:
        assert r["image"] == {"bytes": (data / r["id"]).read_bytes(), "path": r["id"]}
    assert rows[2]["augmented_image"] == {"bytes": png.read_bytes(), "path": "variant.png"}
    assert rows[1]["augmented_image"] is None and "augmented_png" not in t.column_names
    assert pq.ParquetFile(tmp_path / "flagged.parquet").metadata.num_row_groups == 2
    assert b"huggingface" in t.schema.metadata and read_metadata(tmp_path / "flagged.parquet") == {"k": 1}
    assert written == sum(len(r["image"]["bytes"]) for r in rows[1:]) + len(png.read_bytes())
    assert not list(tmp_path.glob(".flagged-images*"))


def test_tables_and_embeddings(tmp_path, write_images):
    data = write_images(n=3, size=(8, 8))
    decided = table_for(data, ["kept", "rejected", "dropped"], flagged=[True, False, False])
    write_tables(tmp_path, decided, {"k": 1})
    assert "augmented_png" not in pq.read_schema(tmp_path / "scores.parquet").names
    assert pq.read_table(tmp_path / "scores.parquet").num_rows == 3
    vectors = np.eye(3, 4, dtype=np.float32)  # one per row ok at scoring time
    write_embeddings(tmp_path, decided, decided, vectors, lambda b: pytest.fail("nothing augmented"), "pixel")
    emb = pq.read_table(tmp_path / EMBEDDINGS).to_pylist()
    assert [r["id"] for r in emb] == ["img000.png", "img002.png"]  # the row rejected since is left out
    assert np.array_equal(emb[1]["embedding"], vectors[2])


def test_an_earlier_output_must_match_the_embedder(tmp_path):
    prev = tmp_path / "prev"
    prev.mkdir()
    with pytest.raises(ValueError, match="not a memclean output"):
        check_against(str(prev), "pixel")
    (prev / "manifest.json").write_text(json.dumps({"dedup": {"embedder": "pixel"}}))
    pq.write_table(pa.table({"id": ["a", "b"], "action": ["kept", "dropped"],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0, 0, 1.0], pa.float32()), 2)}),
                   prev / EMBEDDINGS)
    with pytest.raises(ValueError, match="cannot be compared"):
        check_against(str(prev), "unet")
    outputs = check_against(str(prev), "pixel")
    assert outputs == [str(prev)]
    ids, vecs = earlier_survivors(outputs)
    assert ids == [f"{prev}:a"] and vecs.tolist() == [[1.0, 0.0]]
    with pytest.raises(TypeError, match="list of outputs"):  # a string would be read a character at a time
        earlier_survivors(str(prev))


def test_against_names_several_outputs_or_a_catalog(tmp_path):
    """--against takes one output, several separated by commas, or a dataset catalog (the file or
    the folder holding it): every accepted part, each image named `output:id`."""
    from pipeline.io.outputs import against_outputs

    for name, vec in (("p1", [1.0, 0.0]), ("p2", [0.0, 1.0])):
        prev = tmp_path / "ds" / "parts" / name
        prev.mkdir(parents=True)
        (prev / "manifest.json").write_text(json.dumps({"dedup": {"embedder": "pixel"}}))
        pq.write_table(pa.table({"id": ["x"], "action": ["kept"],
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec, pa.float32()), 2)}),
                       prev / EMBEDDINGS)
    p1, p2 = tmp_path / "ds" / "parts" / "p1", tmp_path / "ds" / "parts" / "p2"
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"parts": [{"drop": "p1", "out": "parts/p1"},
                                                                        {"drop": "p2", "out": "parts/p2"}]}))
    for against in (f"{p1},{p2}", str(tmp_path / "ds" / "dataset.json"), str(tmp_path / "ds")):
        assert against_outputs(against) == check_against(against, "pixel") == [str(p1), str(p2)]
        ids, vecs = earlier_survivors(check_against(against, "pixel"))
        assert ids == [f"{p1}:x", f"{p2}:x"] and vecs.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a memclean dataset catalog"):
        against_outputs(str(tmp_path / "bad.json"))
