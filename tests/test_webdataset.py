"""WebDataset tar shards as --data (io/webdataset.py): shards written by webdataset's own
TarWriter, brace patterns, row-range shards, sidecars, and hostile tars as rejected rows."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memclean.cli import main
from pipeline.io import webdataset as wds_source
from pipeline.io.data import ImageSpec, batched, discover

wds = pytest.importorskip("webdataset")


def png(seed: int, size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "PNG")
    return buf.getvalue()


def write_shards(folder, n_shards: int = 3, per: int = 4) -> list[str]:
    """img2dataset-style shards: key.png (or .jpg), key.json and key.txt per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for k in range(per):
                key = f"{s:05d}{k:04d}"
                sink.write({"__key__": key, "png": png(s * 100 + k), "json": {"caption": f"digit {k}", "k": k},
                            "txt": f"caption {key}"})
                keys.append(f"{s:05d}.tar:{key}")
    return keys


def test_a_folder_a_pattern_and_one_shard(tmp_path):
    keys = write_shards(tmp_path / "shards")
    folder = discover(tmp_path / "shards")
    assert folder.kind == "webdataset" and folder.count() == 12 and [i.id for i in folder] == keys
    pattern = discover(str(tmp_path / "shards" / "{00000..00001}.tar"))
    assert pattern.kind == "webdataset" and [i.id for i in pattern] == keys[:8]
    one = discover(tmp_path / "shards" / "00002.tar")
    assert [i.id for i in one] == keys[8:]
    decoded = [d for b in batched(one, ImageSpec(1, (8, 8)), 8) for d in b]
    assert all(d.reject_reason is None for d in decoded)
    expected = np.asarray(Image.open(io.BytesIO(png(200))), np.float32) / 127.5 - 1
    assert decoded[0].pixels.numpy().tobytes() == expected[None].tobytes()
    sidecar = json.loads(next(iter(one)).sidecar)
    assert json.loads(sidecar["json"]) == {"caption": "digit 0", "k": 0} and sidecar["txt"] == "caption 000020000"


def test_braces_expand_as_webdataset_does():
    from braceexpand import braceexpand  # webdataset's own expander

    for p in ("s/{00000..00012}.tar", "a{1..3}/{x,y}.tar", "{x,y}/{1..2}.tar", "plain.tar", "{9..11}.tar",
              "{01..12}.tar", "{8..010}.tar"):
        assert wds_source.expand_braces(p) == list(braceexpand(p))


def test_a_path_that_exists_is_no_pattern(tmp_path):
    folder = tmp_path / "{a,b}"  # a folder named like a brace pattern is that folder
    folder.mkdir()
    Image.open(io.BytesIO(png(1))).save(folder / "x.png")
    src = discover(folder)
    assert src.kind == "folder" and [i.id for i in src] == ["x.png"]


@pytest.mark.parametrize("size", [1, 3, 100])
def test_shards_are_descriptors_that_cover_the_source(tmp_path, size):
    write_shards(tmp_path / "shards", n_shards=2, per=5)
    src = discover(tmp_path / "shards")
    parts = list(src.shards(size))
    assert all(p.items == () and p.member.endswith(".tar") for p in parts)  # no bytes travel
    assert [i.id for p in parts for i in p] == [i.id for i in src]


def add(tf: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_hostile_tars_are_rejected_rows_with_reasons(tmp_path, zero_model, monkeypatch):
    """Traversal and absolute paths, a link as the image, a member over the size limit, a sample
    with no image, a non-image image member, a truncated shard, a file that is no tar and a shard
    the pattern names but that is missing: every one a row, nothing written outside OUT."""
    monkeypatch.setattr(wds_source, "MEMBER_MAX", 4096)
    d = tmp_path / "shards"
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w") as tf:
        add(tf, "good.png", png(1))
        add(tf, "../escape.png", png(2))
        add(tf, "/etc/abs.png", png(3))
        add(tf, "link.png", b"", tarfile.SYMTYPE, "/etc/passwd")
        add(tf, "big.png", png(4, size=64) + b"\0" * 8192)
        add(tf, "meta.json", b"{}")
        add(tf, "text.jpg", b"this is not a jpeg")
        add(tf, "good.txt", b"the key good again, after other samples")
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tf:
        add(tf, "a.png", png(5))
        add(tf, "b.png", png(6, size=32))
    (d / "00001.tar").write_bytes(full.getvalue()[:512 + 512 + 512 + 100])  # b.png's data cut short
    (d / "00002.tar").write_bytes(b"\x00\x01 no tar here" * 100)
    out = tmp_path / "s.parquet"
    pattern = str(d / "{00000..00003}.tar")
    assert main(["score", "--data", pattern, "--model", str(zero_model), "--out", str(out)]) == 0
    table = pq.read_table(out, columns=["id", "status", "reject_reason"]).to_pylist()
    assert [r["reject_reason"] for r in table if r["id"] == "00000.tar:good"] == [None, "duplicate_key"]
    reasons = {r["id"]: r["reject_reason"] for r in table if r["reject_reason"] != "duplicate_key"}
    assert reasons["00000.tar:good"] is None and reasons["00001.tar:a"] is None
    assert reasons["00000.tar:../escape.png"] == reasons["00000.tar:/etc/abs.png"] == "unsafe_member_path"
    assert reasons["00000.tar:link"] == "not_a_regular_member"
    assert reasons["00000.tar:big"] == "member_too_large"
    assert reasons["00000.tar:meta"] == "no_image_member"
    assert reasons["00000.tar:text"] in ("not_an_image", "corrupt_image")
    assert reasons["00001.tar:b"] == "truncated_tar"
    assert [r for i, r in reasons.items() if i.startswith("00002.tar")] == ["corrupt_tar"]
    assert reasons["00003.tar:"] == "missing_file"
    assert [r["id"] for r in table][:3] == ["00000.tar:good", "00000.tar:../escape.png", "00000.tar:/etc/abs.png"]
    beside = {"s.parquet", "shards", zero_model.name} if zero_model.parent == tmp_path else {"s.parquet", "shards"}
    assert {p.name for p in tmp_path.iterdir()} == beside  # nothing extracted beside them


def test_a_clean_run_on_shards_writes_hf_parquet(tmp_path, zero_model):
    keys = write_shards(tmp_path / "shards", n_shards=2, per=3)
    out = tmp_path / "out"
    assert main(["clean", "--data", str(tmp_path / "shards"), "--model", str(zero_model), "--out", str(out),
                 "--no-cache", "--action", "dedup", "--max-loss-fraction", "1"]) == 0
    scores = pq.read_table(out / "scores.parquet", columns=["id", "sidecar"]).to_pylist()
    assert [r["id"] for r in scores] == keys
    for r, k in zip(scores, [0, 1, 2, 0, 1, 2]):
        sidecar = json.loads(r["sidecar"])
        assert sidecar["txt"] == f"caption {r['id'].split(':')[1]}"
        assert json.loads(sidecar["json"]) == {"caption": f"digit {k}", "k": k}
    cleaned = pq.read_table(out / "cleaned")
    assert cleaned.num_rows + json.loads((out / "manifest.json").read_text())["counts"]["dropped"] == len(keys)
