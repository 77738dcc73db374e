"""`datasets` folders (Dataset.save_to_disk, DatasetDict.save_to_disk) and Arrow files as --data,
written by `datasets` itself: ids, order, row-range shards, bad cells, and a run end to end."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memclean.cli import main
from pipeline.io.data import ImageSpec, batched, discover

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is fetched: these folders are made here
datasets = pytest.importorskip("datasets")


def pictures(n: int, seed: int = 0, size: int = 8) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L") for _ in range(n)]


def save(folder, images, num_shards: int = 1, column: str = "image", **extra):
    ds = datasets.Dataset.from_dict({column: images, "label": list(range(len(images))), **extra})
    ds = ds.cast_column(column, datasets.Image())
    ds.save_to_disk(str(folder), num_shards=num_shards)
    return ds


def pixels_of(source) -> list[bytes]:
    return [d.pixels.numpy().tobytes() for b in batched(source, ImageSpec(1, (8, 8)), 4) for d in b]


def test_a_saved_dataset_reads_in_order_with_file_row_ids(tmp_path):
    images = pictures(7)
    save(tmp_path / "ds", images, num_shards=2)
    src = discover(tmp_path / "ds")
    files = sorted(f for f in os.listdir(tmp_path / "ds") if f.endswith(".arrow"))
    assert src.kind == "arrow" and src.count() == 7 and len(files) == 2
    ids = [item.id for item in src]
    assert datasets.load_from_disk(str(tmp_path / "ds")).num_rows == 7  # the same dataset, read back by datasets
    import pyarrow as pa

    rows = [pa.ipc.open_stream(str(tmp_path / "ds" / f)).read_all().num_rows for f in files]  # each file's, by Arrow
    assert ids == [f"{f}:{r}" for f, n in zip(files, rows) for r in range(n)]
    expected = [np.asarray(img, np.float32) / 127.5 - 1 for img in images]
    assert pixels_of(src) == [e[None].tobytes() for e in expected]
    # and one .arrow file on its own
    one = discover(tmp_path / "ds" / files[0])
    assert one.kind == "arrow" and [i.id for i in one] == [f"{files[0]}:{r}" for r in range(rows[0])]


@pytest.mark.parametrize("size", [1, 3, 100])
def test_shards_are_row_ranges_that_cover_the_dataset(tmp_path, size):
    save(tmp_path / "ds", pictures(7), num_shards=3)
    src = discover(tmp_path / "ds")
    shards = list(src.shards(size))
    assert all(s.items == () for s in shards)  # row ranges: no image travels with a shard
    assert [i.id for s in shards for i in s] == [i.id for i in src]


def test_a_dataset_dict_reads_every_split_in_order(tmp_path):
    train, test = pictures(4, seed=1), pictures(2, seed=2)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"img": train}).cast_column("img", datasets.Image()),
                               "test": datasets.Dataset.from_dict({"img": test}).cast_column("img", datasets.Image())})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = discover(tmp_path / "dd")
    ids = [i.id for i in src]
    assert src.kind == "arrow" and len(ids) == 6
    assert [i.split("/")[0] for i in ids] == ["train"] * 4 + ["test"] * 2
    assert pixels_of(src)[4] == (np.asarray(test[0], np.float32) / 127.5 - 1)[None].tobytes()


def test_score_a_saved_dataset_with_a_bad_cell_rejected(tmp_path, zero_model):
    """A None image and bytes that are no image become rejected rows with reasons; the rest score."""
    images = pictures(3)
    cells = [{"bytes": _png(images[0]), "path": None}, None, {"bytes": b"not an image", "path": None},
             {"bytes": _png(images[2]), "path": None}]
    ds = datasets.Dataset.from_dict({"picture": cells}, features=datasets.Features({"picture": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "s.parquet"
    assert main(["score", "--data", str(tmp_path / "ds"), "--model", str(zero_model), "--out", str(out)]) == 0
    rows = pq.read_table(out, columns=["id", "status", "reject_reason"]).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "rejected", "rejected", "ok"]
    assert [r["reject_reason"] for r in rows][1:3] == ["empty_file", "not_an_image"]
    assert rows[0]["id"].endswith(".arrow:0")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_an_empty_saved_dataset_is_an_error(tmp_path):
    ds = datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="Arrow files have no rows"):
        discover(tmp_path / "ds")
