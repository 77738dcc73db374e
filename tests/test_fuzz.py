"""Hostile input, generated: no file name or file content crashes or hangs scoring; every input
ends scored or rejected with a reason, in bounded time per image (hypothesis)."""
import io
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from diffusers import DDPMScheduler
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from pipeline.io.data import discover
from pipeline.score.models import load_model
from pipeline.score.scoring import score_items
from pipeline.score.volume import ScorerSettings
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet

REASONS = {"empty_file", "corrupt_image", "not_an_image", "decompression_bomb", "too_small", "unreadable",
           "missing_file", "broken_symlink", "symlink_loop", "duplicate_path", "non_finite_score"}
FAST = ScorerSettings(solver="euler", steps=1)


def png(seed: int, size=(12, 10), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    fmt = "JPEG" if seed % 2 == 0 and mode in ("RGB", "L", "1") else "PNG"  # JPEG holds no P, RGBA, I;16
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


@st.composite
def contents(draw) -> bytes:
    """A valid image, one with bytes flipped or cut short, or any bytes at all."""
    base = png(draw(st.integers(0, 50)), (draw(st.integers(1, 40)), draw(st.integers(1, 40))),
               draw(st.sampled_from(["RGB", "L", "P", "RGBA", "1", "I;16"])))
    kind = draw(st.sampled_from(["valid", "flipped", "truncated", "random"]))
    if kind == "valid":
        return base
    if kind == "truncated":
        return base[:draw(st.integers(0, len(base)))]
    if kind == "random":
        return draw(st.binary(max_size=2048))
    data = bytearray(base)
    for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
        data[i] ^= 0xFF
    return bytes(data)


names = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1,
                max_size=40).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_checkpoint(tiny_unet(channels=3, size=8), DDPMScheduler(),
                                      tmp_path_factory.mktemp("fuzz") / "m"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(names, contents(), min_size=1, max_size=4))
def test_no_input_crashes_or_hangs_and_each_ends_scored_or_rejected(tmp_path_factory, model, files):
    root = tmp_path_factory.mktemp("in")
    for name, data in files.items():
        (root / (name + ".png")).write_bytes(data)  # the suffix makes the folder source take it
    t0 = time.perf_counter()
    rows = [r for batch in score_items(model, discover(root), FAST, batch_size=3) for r in batch]
    assert time.perf_counter() - t0 < 20 * len(files)  # bounded per image, even on a slow machine
    assert len(rows) == len({n + ".png" for n in files})
    for r in rows:
        assert r["status"] in ("ok", "rejected")
        if r["status"] == "ok":
            assert np.isfinite(r["log_volume_growth"]) and r["reject_reason"] is None
        else:
            assert r["reject_reason"] in REASONS and r["log_volume_growth"] is None


@pytest.mark.parametrize("table", [
    pa.table({"image": pa.array([png(1), None, b"", b"\x00" * 5], pa.binary())}),  # nulls, empty, junk
    pa.table({"image": [{"bytes": png(2), "path": None}, {"bytes": None, "path": "missing.png"},
                        {"bytes": None, "path": None}], "extra": [1, 2, 3]}),  # struct cells, an extra column
    pa.table({"image": pa.array([png(3), png(4) + os.urandom(3_000_000)], pa.large_binary())}),  # a huge cell
], ids=["nulls", "struct", "huge"])
def test_hostile_parquet_cells_are_accounted_for(tmp_path, model, table):
    pq.write_table(table, tmp_path / "d.parquet")
    rows = [r for b in score_items(model, discover(tmp_path / "d.parquet"), FAST, batch_size=2) for r in b]
    assert len(rows) == table.num_rows
    assert all(r["status"] == "ok" or r["reject_reason"] in REASONS for r in rows)
    assert rows[0]["status"] == "ok"


@pytest.mark.parametrize("table,match", [
    (pa.table({"label": [1, 2]}), "column"),  # no image column at all
    (pa.table({"image": ["not", "bytes"]}), "column"),  # the wrong type
])
def test_parquet_without_images_is_a_clear_error(tmp_path, table, match):
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=match):
        list(discover(tmp_path / "d.parquet"))


def test_a_list_file_with_blanks_comments_duplicates_and_missing_entries(tmp_path, model):
    (tmp_path / "a.png").write_bytes(png(5))
    (tmp_path / "list.txt").write_text("# images\n\na.png\n  \na.png\nnope.png\n# end\n")
    rows = [r for b in score_items(model, discover(tmp_path / "list.txt"), FAST) for r in b]
    assert [r["reject_reason"] for r in rows] == [None, "duplicate_path", "missing_file"]
