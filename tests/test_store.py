"""Atomic Parquet writers, output folders that appear whole or not at all, table helpers."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.store import (COMPLETE_MARKER, AtomicParquetWriter, OutputSettings, check_output_dir,
                               commit_dir, ok_mask, read_metadata, score_values, staging_dir)

SCHEMA = pa.schema([("id", pa.string()), ("v", pa.float64())])


def test_a_writer_publishes_on_commit_with_its_metadata_in_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    with AtomicParquetWriter(path, SCHEMA, {"answer": 42}, row_group_size=3) as w:
        w.write({"id": str(i), "v": float(i)} for i in range(7))
        assert not path.exists() and w.count == 7
    table = pq.read_table(path)
    assert table.column("v").to_pylist() == [float(i) for i in range(7)]
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    assert read_metadata(path) == {"answer": 42}


def test_an_exception_leaves_no_file_and_no_temporary(tmp_path):
    path = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError):
        with AtomicParquetWriter(path, SCHEMA, {}) as w:
            w.write([{"id": "a", "v": 1.0}])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_an_output_folder_is_committed_whole_and_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    staging = staging_dir(out)
    (staging / "scores.parquet").write_text("x")
    commit_dir(staging, out, overwrite=False)
    assert (out / COMPLETE_MARKER).is_file() and not staging.exists()
    with pytest.raises(FileExistsError, match="complete memclean output"):
        check_output_dir(out, overwrite=False)
    second = staging_dir(out)
    (second / "scores.parquet").write_text("y")
    commit_dir(second, out, overwrite=True)
    assert (out / "scores.parquet").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_left_by_a_dead_run_is_removed(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999"  # no such process
    dead.mkdir()
    staging_dir(out)
    assert not dead.exists()


def test_table_helpers_and_output_settings():
    t = pa.table({"status": ["ok", "rejected", "ok"], "v": [1.5, None, -2.0]})
    assert ok_mask(t).tolist() == [True, False, True]
    v = score_values(t, "v")
    assert v[0] == 1.5 and np.isnan(v[1]) and v[2] == -2.0
    with pytest.raises(ValueError):
        OutputSettings(out="x", shard_rows=0)


def test_an_output_lock_admits_one_run(tmp_path):
    from pipeline.io.store import OutputLock

    out = tmp_path / "out"
    first = OutputLock(out)
    with pytest.raises(FileExistsError, match=f"pid {os.getpid()}"):
        OutputLock(out)
    first.release()
    OutputLock(out).release()


def test_an_unwritable_output_folder_is_named(tmp_path, monkeypatch):
    from pipeline.io.store import writable

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(PermissionError, match="not writable"):
        writable(tmp_path)
