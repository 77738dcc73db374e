"""`memclean score` through the whole command-line path, against exact answers."""
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.cli import main
from pipeline.schedules import LinearVP
from pipeline.store import read_metadata
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet

EXPECTED_COLUMNS = {"id", "path", "sha256", "status", "reject_reason", "log_volume_growth",
                    "prior_logp", "logp", "bits_per_dim", "nfe", "divergence", "probes", "solver",
                    "steps", "rtol", "atol", "eps", "seed", "grid", "model_fingerprint"}


@pytest.fixture
def zero_model(tmp_path):
    unet = tiny_unet(channels=3, size=4)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    return save_checkpoint(unet, DDPMScheduler(beta_start=1e-4, beta_end=0.02), tmp_path / "zero")


@pytest.mark.parametrize("divergence", ["rademacher", "exact"])
def test_zero_network_through_the_cli(tmp_path, zero_model, write_images, divergence):
    data = write_images(n=3, size=(12, 10), mode="RGB")
    (data / "empty.png").write_bytes(b"")
    (data / "sub").mkdir()
    (data / "sub" / "text.jpg").write_text("not an image")
    out = tmp_path / "scores.parquet"
    rc = main(["score", "--data", str(data), "--model", str(zero_model), "--out", str(out),
               "--divergence", divergence, "--rtol", "1e-7", "--atol", "1e-7", "--batch-size", "2"])
    assert rc == 0
    table = pq.read_table(out).to_pylist()
    assert EXPECTED_COLUMNS <= set(pq.read_schema(out).names)
    by_id = {r["id"]: r for r in table}
    assert set(by_id) == {"img000.png", "img001.png", "img002.png", "empty.png", "sub/text.jpg"}
    assert by_id["empty.png"]["reject_reason"] == "empty_file"
    assert by_id["sub/text.jpg"]["reject_reason"] == "not_an_image"
    s = LinearVP(1000, 1e-4, 0.02)
    la = lambda t: float(s.log_abar(torch.tensor(t, dtype=torch.float64)))
    expected = 3 * 4 * 4 / 2 * (la(1.0) - la(1e-5))
    ok = [r for r in table if r["status"] == "ok"]
    assert len(ok) == 3
    for r in ok:
        assert r["log_volume_growth"] == pytest.approx(expected, rel=1e-6)
        assert r["logp"] == pytest.approx(r["prior_logp"] + r["log_volume_growth"])
        assert r["divergence"] == divergence and r["solver"] == "dopri5" and r["nfe"] > 0
        assert len(r["sha256"]) == 64
    meta = read_metadata(out)
    assert meta["settings"]["divergence"] == divergence
    assert meta["model"]["fingerprint"] == ok[0]["model_fingerprint"]


def test_existing_output_needs_overwrite_and_nothing_partial_is_left(tmp_path, zero_model, write_images, capsys):
    data = write_images(n=1)
    out = tmp_path / "s.parquet"
    out.write_text("previous")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["score", "--data", str(data), "--model", str(zero_model), "--out", str(out)])
    assert out.read_text() == "previous"


def test_a_crash_mid_run_leaves_no_partial_output(tmp_path, zero_model, write_images, monkeypatch):
    import pipeline.scoring

    data = write_images(n=4)
    real = pipeline.scoring.score_batch
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.scoring, "score_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="worker killed"):
        main(["score", "--data", str(data), "--model", str(zero_model), "--out", str(tmp_path / "o.parquet"),
              "--batch-size", "2", "--solver", "euler", "--steps", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "zero"]


def test_bad_settings_and_models_fail_cleanly(tmp_path, write_images, capsys):
    data = write_images(n=1)
    rc = main(["score", "--data", str(data), "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o.parquet")])
    assert rc == 2 and "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()
    with pytest.raises(SystemExit):
        main(["score", "--data", str(data), "--model", "m", "--out", "o.parquet", "--solver", "rk45"])
    rc = main(["score", "--data", str(data), "--model", "m", "--out", str(tmp_path / "o.parquet"), "--probes", "0"])
    assert rc == 2 and "probes" in capsys.readouterr().err
