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
    s = ScoreSettings.from_flat({"data": str(data), "model": str(model), "out": str(out), "solver": "euler", "steps": 2,
                                "precision_target": 0})  # one pass: passes are the next test's
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


def test_score_spends_passes_as_clean_does(tmp_path, write_images):
    """A target no pass reaches (1e-9) runs --max-passes 2; the rows are then the mean of the
    one-pass files of seeds 0 and 1, to float64 rounding of the mean of two numbers (the
    scores themselves are identical: probes and noises are a hash of the seed and the pixels)."""
    data = write_images(n=3, size=(8, 8))
    model = save_checkpoint(tiny_unet(), DDPMScheduler(), tmp_path / "m")
    base = {"data": str(data), "model": str(model), "solver": "euler", "steps": 2, "loss_noises": 2}
    two = ScoreSettings.from_flat({**base, "out": str(tmp_path / "two.parquet"), "precision_target": 1e-9,
                                   "max_passes": 2})
    assert score_to_parquet(two) == (3, 0)
    meta = read_metadata(tmp_path / "two.parquet")
    assert meta["precision"]["passes"] == 2 and len(meta["precision"]["noise_ratio_after_each"]) == 2
    assert list(meta["timings_s"]) == ["compile", "score", "score_pass2"]
    singles = []
    for seed in (0, 1):
        s = ScoreSettings.from_flat({**base, "out": str(tmp_path / f"s{seed}.parquet"), "precision_target": 0,
                                     "seed": seed})
        score_to_parquet(s)
        assert read_metadata(tmp_path / f"s{seed}.parquet")["precision"]["passes"] == 1
        singles.append(pq.read_table(tmp_path / f"s{seed}.parquet").to_pydict())
    rows = pq.read_table(tmp_path / "two.parquet").to_pydict()
    assert rows["passes"] == [2, 2, 2] and rows["nfe"] == [a + b for a, b in zip(singles[0]["nfe"], singles[1]["nfe"])]
    for col in ("log_volume_growth", "denoising_loss"):
        assert singles[0][col] != singles[1][col]  # two seeds: two estimates
        assert rows[col] == pytest.approx([(a + b) / 2 for a, b in zip(singles[0][col], singles[1][col])], rel=1e-12)
