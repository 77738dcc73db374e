"""The staged run every verb writes through: locked, staged beside OUT, committed whole or
removed, each stage timed with its memory."""
import os

import pytest

from pipeline.io.store import COMPLETE_MARKER
from pipeline.run.staged import StagedRun


def leftovers(folder):
    """Hidden staging folders or lock files beside an output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_folder_appears_whole_on_commit_and_the_lock_is_released(tmp_path):
    out = tmp_path / "out"
    with StagedRun(out, overwrite=False) as run:
        with pytest.raises(FileExistsError, match="another memclean run"):
            StagedRun(out, overwrite=False).open()  # one run per OUT
        with run.stage("write"):
            (run.staging / "a.txt").write_text("a")
        assert not out.exists()  # nothing visible before the commit
        run.commit()
    assert sorted(p.name for p in out.iterdir()) == [COMPLETE_MARKER, "a.txt"] and leftovers(tmp_path) == []
    rec = run.record()
    assert set(rec) == {"timings_s", "peak_rss_mb", "held_mb"} and list(rec["timings_s"]) == ["write"]
    assert rec["timings_s"]["write"] >= 0 and rec["peak_rss_mb"]["write"] > 0
    if os.path.exists("/proc/self/status"):  # Linux: anonymous memory after the stage
        assert rec["held_mb"]["write"] > 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        StagedRun(out, overwrite=False).open()  # the lock is free again; the finished output is refused


def test_an_error_or_a_missing_commit_leaves_the_old_output_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with StagedRun(out, overwrite=True) as run:
            with run.stage("score"):
                (run.staging / "new.txt").write_text("new")
                raise RuntimeError("boom")
    assert run.timings["score"] >= 0  # a failed stage is still timed
    with StagedRun(out, overwrite=True) as run:
        (run.staging / "new.txt").write_text("new")  # and never committed
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and leftovers(tmp_path) == []
    with StagedRun(out, overwrite=True) as run:
        (run.staging / "new.txt").write_text("new")
        run.commit()
    assert sorted(p.name for p in out.iterdir()) == [COMPLETE_MARKER, "new.txt"]


def test_a_file_output_is_moved_into_place_and_never_replaces_a_folder(tmp_path):
    out = tmp_path / "scores.parquet"
    with StagedRun(out, overwrite=False, file=True) as run:
        run.target.write_bytes(b"one")
        run.commit()
    assert out.read_bytes() == b"one" and leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="--overwrite"):
        StagedRun(out, overwrite=False, file=True).open()
    with StagedRun(out, overwrite=True, file=True) as run:
        run.target.write_bytes(b"two")
        run.commit()
    assert out.read_bytes() == b"two"
    (tmp_path / "folder.parquet").mkdir()
    with pytest.raises(FileExistsError, match="is a folder"):
        StagedRun(tmp_path / "folder.parquet", overwrite=True, file=True).open()
    assert leftovers(tmp_path) == []
