"""Decoding and preparation: modes, EXIF, alpha, crop and resize, rejections."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io.data import (ImageSpec, Item, Rejected, center_crop_resize, decode_image, decode_item,
                           discover, to_model_mode)


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_uint8_maps_to_minus_one_one():
    arr = np.array([[0, 255], [127, 128]], dtype=np.uint8)
    x = decode_image(png_bytes(Image.fromarray(arr, "L")), ImageSpec(1, (2, 2), min_size=1))
    assert x.shape == (1, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(arr, dtype=torch.float32) / 127.5 - 1)


def test_center_crop_then_resize():
    arr = np.zeros((4, 8), dtype=np.uint8)
    arr[:, 2:6] = 255  # the centred 4x4 square is white, the sides black
    out = center_crop_resize(Image.fromarray(arr, "L"), (4, 4))
    assert np.asarray(out).min() == 255
    assert center_crop_resize(Image.fromarray(arr, "L"), (2, 2)).size == (2, 2)
    tall = center_crop_resize(Image.new("L", (3, 9)), (2, 4))
    assert tall.size == (4, 2)  # PIL size is (W, H)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "1", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_every_mode_converts(mode, channels):
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray(np.full((5, 5), 30000, dtype=np.uint16))  # mode I;16
        img = img if mode == "I;16" else img.convert(mode)
    else:
        img = Image.new("RGB", (5, 5), (200, 100, 50)).convert(mode)
    assert img.mode == mode
    out = to_model_mode(img, channels)
    assert out.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    x = decode_image(png_bytes(img), ImageSpec(3, (2, 2), min_size=1))
    assert torch.all(x == 1.0)


@pytest.mark.parametrize("values,mode,expected", [
    (np.full((2, 2), 65535, dtype=np.uint16), None, 255),  # I;16 full scale
    (np.full((2, 2), 32768, dtype=np.uint16), None, 128),
    (np.full((2, 2), 200, dtype=np.int32), "I", 200),  # 8-bit values in a 32-bit image
    (np.full((2, 2), 0.5, dtype=np.float32), "F", 128),  # floats in [0, 1]
])
def test_high_bit_depths_scale_by_their_range(values, mode, expected):
    img = Image.fromarray(values) if mode is None else Image.fromarray(values, mode)
    assert np.asarray(to_model_mode(img, 1)).max() == expected


def test_exif_orientation_is_applied():
    arr = np.zeros((2, 4, 3), dtype=np.uint8)
    arr[:, :2] = 255  # left half white
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    x = decode_image(png_bytes(img, "PNG", exif=exif.tobytes()), ImageSpec(1, (4, 2), min_size=1))
    assert x.shape == (1, 4, 2)
    assert torch.all(x[0, :2] == 1.0) and torch.all(x[0, 2:] == -1.0)  # white on top after rotation


def test_gif_first_frame():
    frames = [Image.new("L", (4, 4), v) for v in (255, 0)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert torch.all(decode_image(buf.getvalue(), ImageSpec(1, (4, 4), min_size=1)) == 1.0)


@pytest.mark.parametrize("data,reason", [(b"", "empty_file"), (b"hello", "not_an_image"),
                                         (None, "corrupt_image")])
def test_rejections(data, reason):
    if data is None:
        data = png_bytes(Image.new("RGB", (64, 64)))[:60]  # truncated
    with pytest.raises(Rejected) as e:
        decode_image(data, ImageSpec(1, (8, 8), min_size=1))
    assert e.value.reason == reason


def test_unreadable_item_is_rejected_not_raised():
    def fail():
        raise PermissionError("denied")

    d = decode_item(Item("a", "a.png", fail), ImageSpec(1, (8, 8), min_size=1))
    assert d.reject_reason == "unreadable" and d.pixels is None and d.sha256 is None


def test_folder_discovery_is_recursive_sorted_and_filters_suffixes(tmp_path, caplog):
    for name in ["b.png", "a.JPG", "sub/c.webp", "notes.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [i.id for i in discover(tmp_path)] == ["a.JPG", "b.png", "sub/c.webp"]
    for name in ["sub/d.PPM", "sub/e.ppm", "README"]:  # Pillow reads .ppm, memclean's folders do not
        (tmp_path / name).write_bytes(b"x")
    source = discover(tmp_path)
    with caplog.at_level("WARNING", logger="pipeline.io.data"):
        records = [source.record(), source.record()]  # the manifest is written twice at a commit
    assert records[0] == records[1] == {"path": str(tmp_path), "kind": "folder",  # what the run left, said
                                        "skipped_files": {"(no extension)": 1, ".ppm": 2, ".txt": 1}}
    assert [r.getMessage().count("4 files not read as images") for r in caplog.records] == [1]  # walked and said once
    with pytest.raises(ValueError, match="does not exist"):
        discover(tmp_path / "missing")


@pytest.mark.parametrize("files,named", [
    (["a.png", "shards/00000.tar"], "both image files and WebDataset .tar shards"),
    (["a.png", "cache/data.arrow"], "both image files and Arrow files"),
    (["part.parquet", "00000.tar"], "both Parquet files and WebDataset .tar shards"),
    (["a.png", "t.parquet", "x.arrow", "y.tar"], "image files, Parquet files, Arrow files and WebDataset .tar shards")])
def test_a_folder_of_two_kinds_is_refused_not_read_as_one(tmp_path, files, named):
    """A folder holding images beside .tar shards (or any two kinds) read as one kind would leave
    the other's images out of the run without a word: it is refused, naming what it holds."""
    for name in files:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ValueError, match=f"holds {named}: memclean reads one kind per source"):
        discover(tmp_path)


# ---- sources and a hostile corpus ----------------------------------------------------------

def hostile_folder(root):
    """Good images of every mode beside every kind of bad input; returns {id: expected reason}."""
    import os

    root.mkdir()
    expected = {}
    modes = {"L": "png", "LA": "png", "P": "png", "RGB": "jpg", "RGBA": "webp", "CMYK": "jpg",
             "1": "bmp", "I;16": "tif"}
    for mode, ext in modes.items():
        img = Image.new("RGB", (20, 16), (10, 200, 90)).convert(mode) if mode != "I;16" else \
            Image.fromarray(np.full((16, 20), 40000, dtype=np.uint16))
        img.save(root / f"good_{mode.replace(';', '')}.{ext}")
        expected[f"good_{mode.replace(';', '')}.{ext}"] = None
    frames = [Image.new("P", (12, 12), i) for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    expected["anim.gif"] = None
    (root / "zero.png").write_bytes(b"")
    expected["zero.png"] = "empty_file"
    (root / "truncated.png").write_bytes(png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:80])
    expected["truncated.png"] = "corrupt_image"
    (root / "text.jpg").write_text("hello, not an image")
    expected["text.jpg"] = "not_an_image"
    Image.new("L", (300, 300)).save(root / "bomb.png")  # over the test's max_pixels
    expected["bomb.png"] = "decompression_bomb"
    Image.new("L", (4, 40)).save(root / "small.png")
    expected["small.png"] = "too_small"
    os.symlink(root / "nowhere.png", root / "broken.png")
    expected["broken.png"] = "broken_symlink"
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    expected["loop_a.png"] = expected["loop_b.png"] = "symlink_loop"
    os.mkfifo(root / "fifo.png")
    expected["fifo.png"] = "unreadable"
    (root / "sub").mkdir()
    Image.new("L", (10, 10), 7).save(os.fsdecode(os.path.join(os.fsencode(root / "sub"), b"caf\xe9.png")))
    expected["sub/caf\\xe9.png"] = None
    os.symlink(root, root / "sub" / "back")  # a folder loop
    return expected


def test_hostile_folder_every_input_accounted_for(tmp_path):
    from pipeline.io.data import batched

    expected = hostile_folder(tmp_path / "data")
    spec = ImageSpec(3, (8, 8), max_pixels=50_000, min_size=8)
    decoded = [d for batch in batched(discover(tmp_path / "data"), spec, 4) for d in batch]
    got = {d.item.id: d.reject_reason for d in decoded}
    assert got == expected
    assert discover(tmp_path / "data").count() == len(expected)
    for d in decoded:
        if d.reject_reason is None:
            assert d.pixels.shape == (3, 8, 8) and d.pixels.min() >= -1 and d.pixels.max() <= 1
            assert len(d.pixel_sha256) == 64
    odd = next(d for d in decoded if d.item.id.startswith("sub/caf"))
    assert odd.item.path_bytes.endswith(b"sub/caf\xe9.png")


def test_pixel_hash_is_format_independent():
    from pipeline.io.data import open_image, pixel_sha256

    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    spec = ImageSpec(1, (8, 8))
    a = pixel_sha256(open_image(png_bytes(img), spec))
    b = pixel_sha256(open_image(png_bytes(img, "BMP"), spec))
    c = pixel_sha256(open_image(png_bytes(img, "JPEG", quality=50), spec))
    assert a == b != c


def test_list_file_source_with_duplicates_and_missing(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("L", (10, 10)).save(tmp_path / name)
    (tmp_path / "list.txt").write_text("# images\na.png\n\nb.png\n./a.png\nmissing.png\n")
    src = discover(tmp_path / "list.txt")
    assert src.kind == "list" and src.count() == 4
    reasons = [decode_item(i, ImageSpec(1, (8, 8))).reject_reason for i in src]
    assert reasons == [None, None, "duplicate_path", "missing_file"]


@pytest.mark.parametrize("layout", ["hf_struct", "binary", "folder"])
def test_parquet_sources(tmp_path, layout):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [png_bytes(Image.new("L", (10, 10), v)) for v in (0, 100, 200)] + [b""]
    if layout == "binary":
        table = pa.table({"id": ["a", "b", "c", "d"], "png": pa.array(blobs, pa.binary())})
    else:
        structs = [{"bytes": b, "path": f"x{i}.png"} for i, b in enumerate(blobs)]
        table = pa.table({"image": structs, "label": [0, 1, 2, 3]})
    target = tmp_path / "data"
    target.mkdir()
    if layout == "folder":
        pq.write_table(table.slice(0, 2), target / "part-0.parquet")
        pq.write_table(table.slice(2), target / "part-1.parquet")
        src = discover(target)
    else:
        pq.write_table(table, target / "d.parquet", row_group_size=2)
        src = discover(target / "d.parquet")
    assert src.kind == "parquet" and src.count() == 4
    decoded = [decode_item(i, ImageSpec(1, (8, 8))) for i in src]
    assert [d.reject_reason for d in decoded] == [None, None, None, "empty_file"]
    assert [round(float(d.pixels.mean()) * 127.5 + 127.5) for d in decoded[:3]] == [0, 100, 200]
    assert len({d.item.id for d in decoded}) == 4


def test_parquet_without_an_obvious_image_column_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": pa.array([b"x"], pa.binary()), "b": pa.array([b"y"], pa.binary())}),
                   tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="--image-column"):
        list(discover(tmp_path / "t.parquet"))
    assert [i.id for i in discover(tmp_path / "t.parquet", image_column="b")] == ["t.parquet:0"]


@pytest.mark.parametrize("size", [1, 3, 4, 7, 50])
def test_shards_cover_a_source_exactly_and_parquet_shards_carry_no_bytes(tmp_path, size):
    """Parquet shards are row ranges (a few hundred bytes pickled, whatever the images weigh),
    read back from only the row groups that hold them; folder shards carry their paths. Every
    item appears once, in order, across files and row groups."""
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    big = [png_bytes(Image.new("L", (64, 64), v)) + bytes(20_000) for v in range(11)]
    target = tmp_path / "data"
    target.mkdir()
    table = pa.table({"image": [{"bytes": b, "path": None} for b in big]})
    pq.write_table(table.slice(0, 6), target / "a.parquet", row_group_size=4)
    pq.write_table(table.slice(6), target / "b.parquet", row_group_size=2)
    src = discover(target)
    shards = list(src.shards(size))
    assert [(s.start, s.stop) for s in shards] == [(a, min(a + size, 11)) for a in range(0, 11, size)]
    ids = [i.id for s in shards for i in s]
    assert ids == [i.id for i in src] and len(ids) == 11
    assert [i.read() for s in shards for i in s] == big
    assert all(len(pickle.dumps(s)) < 1000 for s in shards)
    folder = write_images_in(tmp_path / "imgs", 5)
    fshards = list(discover(folder).shards(size))
    assert [i.id for s in fshards for i in s] == [i.id for i in discover(folder)]


def write_images_in(root, n):
    root.mkdir()
    for k in range(n):
        (root / f"i{k}.png").write_bytes(png_bytes(Image.new("L", (8, 8), k)))
    return root
