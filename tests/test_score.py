"""`memclean score` as a library call: one Parquet file, written whole, with its settings."""
import pyarrow.parquet as pq
import pytest
from diffusers import DDPMScheduler

from pipeline.io.store import read_metadata
from pipeline.run.score import count_inputs, score_to_parquet
from pipeline.run.settings import ScoreSettings
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet


def test_score_to_parquet(tmp_path, write_images):
    data = write_images(n=3, size=(8, 8))
    (data / "empty.png").write_bytes(b"")
    model = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "m")
    out = tmp_path / "s.parquet"
    s = ScoreSettings.from_flat({"data": str(data), "model": str(model), "out": str(out), "solver": "euler", "steps": 2})
    assert count_inputs(str(data), None) == 4
    assert score_to_parquet(s) == (4, 1)
    assert pq.read_table(out).num_rows == 4
    meta = read_metadata(out)
    # the settings as resolved: --batch-size 16 and --precision fp32 on the CPU (score/ready.py)
    assert meta["settings"] == {**s.flat(), "batch_size": 16, "precision": "fp32"} and meta["model"]["layout"] == "flat"
    # the staged run's record, under the keys every verb's manifest has
    assert list(meta["timings_s"]) == list(meta["peak_rss_mb"]) == ["compile", "score"] and meta["timings_s"]["score"] > 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or lock left
    with pytest.raises(FileExistsError, match="--overwrite"):
        score_to_parquet(s)
