"""`memclean score` through the whole command-line path, against exact answers."""
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from memclean.cli import main
from pipeline.score.schedules import LinearVP
from pipeline.io.data import discover
from pipeline.io.store import read_metadata
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet

EXPECTED_COLUMNS = {"id", "path", "sha256", "status", "reject_reason", "log_volume_growth",
                    "prior_logp", "logp", "bits_per_dim", "nfe", "divergence", "probes", "solver",
                    "steps", "rtol", "atol", "eps", "seed", "grid", "model_fingerprint", "probe_mode",
                    "precision"}


@pytest.mark.parametrize("divergence", ["rademacher", "exact"])
def test_zero_network_through_the_cli(tmp_path, zero_model, write_images, divergence, capsys):
    data = write_images(n=3, size=(12, 10), mode="RGB")
    (data / "empty.png").write_bytes(b"")
    (data / "sub").mkdir()
    (data / "sub" / "text.jpg").write_text("not an image")
    out = tmp_path / "scores.parquet"
    rc = main(["score", "--data", str(data), "--model", str(zero_model), "--out", str(out),
               "--divergence", divergence, "--batch-size", "2"])
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
        # the linear part of the drift is integrated in closed form: float64 rounding only
        assert r["log_volume_growth"] == pytest.approx(expected, rel=64 * 2.0**-52)
        assert r["logp"] == pytest.approx(r["prior_logp"] + r["log_volume_growth"])
        assert r["divergence"] == divergence and r["solver"] == "heun" and r["nfe"] > 0
        assert r["probe_mode"] == "fresh" and r["precision"] == "fp32"
        assert len(r["sha256"]) == 64
    meta = read_metadata(out)
    assert meta["settings"]["divergence"] == divergence
    # the passes spent (--precision-target), in every row and in what the command printed
    passes = meta["precision"]["passes"]
    assert {r["passes"] for r in ok} == {passes} and f"in {passes} pass(es)" in capsys.readouterr().out
    assert all(r["passes"] is None for r in table if r["status"] != "ok")  # a rejected row averaged no score
    assert meta["model"]["fingerprint"] == ok[0]["model_fingerprint"]


def test_existing_output_needs_overwrite_and_nothing_partial_is_left(tmp_path, zero_model, write_images, capsys):
    data = write_images(n=1)
    out = tmp_path / "s.parquet"
    out.write_text("previous")
    assert main(["score", "--data", str(data), "--model", str(zero_model), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "previous"


def test_a_crash_mid_run_leaves_no_partial_output(tmp_path, zero_model, write_images, monkeypatch):
    import pipeline.score.scoring

    data = write_images(n=4)
    real = pipeline.score.scoring.score_batch
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.score.scoring, "score_batch", crash_on_second_batch)
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


@pytest.mark.parametrize("data_range,lo,hi", [("auto", 0.0, 1.0), ("signed", -1.0, 1.0)])
def test_a_ve_model_scores_images_in_its_data_range(tmp_path, write_images, data_range, lo, hi):
    """A zero NCSN++-style VE model: f = 0, so V = 0 and x_1 = x, and log p is the prior
    N(0, sigma_max^2 I) at the image itself, which depends on the range the image is given in:
    [0, 1] for VE models (score_sde's VE configs leave data uncentred), unless overridden. The
    bits/dim offset is log2(255 / (hi - lo)): the width of an 8-bit bin in that range."""
    import math

    from diffusers import ScoreSdeVeScheduler

    from pipeline.io.data import ImageSpec, decode_image

    unet = tiny_unet(channels=3, size=4)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    model = save_checkpoint(unet, ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0), tmp_path / "ve")
    data = write_images(n=2, size=(8, 8), mode="RGB")
    out = tmp_path / "s.parquet"
    assert main(["score", "--data", str(data), "--model", str(model), "--out", str(out),
                 "--data-range", data_range]) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        x = decode_image((data / r["id"]).read_bytes(), ImageSpec(3, (4, 4), data_range=(lo, hi))).double()
        assert x.min() >= lo and x.max() <= hi
        prior = -0.5 * float((x**2).sum()) / 50.0**2 - 48 / 2 * math.log(2 * math.pi * 50.0**2)
        assert r["log_volume_growth"] == 0.0
        assert r["logp"] == pytest.approx(prior, rel=1e-12)
        assert r["bits_per_dim"] == pytest.approx(-prior / (48 * math.log(2)) + math.log2(255 / (hi - lo)), rel=1e-12)
        assert r["data_range"] == f"[{lo:g}, {hi:g}]"
    assert read_metadata(out)["model"]["bits_per_dim_offset"] == pytest.approx(math.log2(255 / (hi - lo)))


@pytest.mark.parametrize("extra,message", [
    (["--flag-quantile", "1.5"], "--flag-quantile must be in (0, 1)"),
    (["--flag-fpr", "0.1"], "--flag-fpr needs --reference"),
    (["--reference", "REF", "--flag-quantile", "0.9"], "choose one flagging policy"),
    (["--augment-tries", "50"], "--augment-tries must be between 1 and 20"),
    (["--accept-band", "0.7"], "--accept-band"),
    (["--action", "none", "--against", "PREV"], "--against compares"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--solver", "dopri5", "--probe-mode", "fresh"], "fixed-grid"),
    (["--dup-threshold", "2"], "--dup-threshold"),
])
def test_bad_clean_settings_fail_before_any_image_is_decoded(tmp_path, zero_model, write_images, monkeypatch,
                                                            capsys, extra, message):
    import pipeline.io.data

    data = write_images(n=2)
    monkeypatch.setattr(pipeline.io.data, "decode_item", lambda *a, **k: pytest.fail("an image was decoded"))
    extra = [str(data) if e in ("REF", "PREV") else e for e in extra]
    rc = main(["clean", "--data", str(data), "--model", str(zero_model), "--out", str(tmp_path / "out"), *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_image_file_is_a_one_image_input(tmp_path, zero_model, write_images):
    """An image file is recognised by its content, whatever its name: a PNG named .dat is that
    image (its file name the id), and a text file is still a list."""
    data = write_images(n=2)
    shutil.copy(data / "img000.png", tmp_path / "picture.dat")
    for path, ids in ((data / "img001.png", ["img001.png"]), (tmp_path / "picture.dat", ["picture.dat"])):
        out = tmp_path / f"{path.stem}.parquet"
        assert main(["score", "--data", str(path), "--model", str(zero_model), "--out", str(out)]) == 0
        t = pq.read_table(out)
        assert t.column("id").to_pylist() == ids and t.column("status").to_pylist() == ["ok"]
    (tmp_path / "list.png").write_text(str(data / "img000.png") + "\n")  # text named like an image: a list
    assert discover(tmp_path / "list.png").kind == "list"


def test_data_paths_that_are_not_a_source_are_refused(tmp_path, zero_model, write_images, capsys):
    data = write_images(n=2)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01 not an image" * 10)
    rc = main(["score", "--data", str(tmp_path / "blob.bin"), "--model", str(zero_model), "--out", str(tmp_path / "s.parquet")])
    assert rc == 2 and "neither an image Pillow recognises nor a text file" in capsys.readouterr().err
    import pyarrow as pa

    pq.write_table(pa.table({"image": [b"x"]}), data / "extra.parquet")
    rc = main(["score", "--data", str(data), "--model", str(zero_model), "--out", str(tmp_path / "s.parquet")])
    assert rc == 2 and "both image files and Parquet files" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_a_zero_unet_in_a_latent_pipeline_has_the_closed_form_through_the_cli(tmp_path, write_images, kind):
    """eps_hat = 0 in the latent: V = D_z/2 (log abar(1) - log abar(eps)) with D_z the latent's
    size, not the image's; bits/dim are per latent dimension, with no 8-bit offset."""
    import math

    from tests.exact import save_latent_pipeline, tiny_autoencoder

    latent_channels = tiny_autoencoder(kind).config.latent_channels
    unet = tiny_unet(channels=latent_channels, size=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    model = save_latent_pipeline(tmp_path / "ldm", kind, unet=unet)
    data = write_images(n=2, size=(16, 16), mode="RGB")
    out = tmp_path / "s.parquet"
    assert main(["score", "--data", str(data), "--model", str(model), "--out", str(out)]) == 0
    s = LinearVP(1000, 1e-4, 0.02)
    la = lambda t: float(s.log_abar(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    D_z = latent_channels * 8 * 8
    for r in pq.read_table(out).to_pylist():
        assert r["score_space"] == "latent" and r["latent_shape"] == f"{latent_channels}x8x8"
        assert r["log_volume_growth"] == pytest.approx(D_z / 2 * (la(1.0) - la(1e-5)), rel=64 * 2.0**-52)
        assert r["bits_per_dim"] == pytest.approx(-r["logp"] / (D_z * math.log(2)), rel=1e-12)
    meta = read_metadata(out)["model"]
    assert meta["score_space"] == "latent" and meta["bits_per_dim_offset"] == 0.0


@pytest.mark.parametrize("verb", ["score", "clean", "dedup", "train"])
def test_an_input_with_no_images_fails_every_verb_naming_what_it_holds(tmp_path, zero_model, verb, capsys):
    """A folder of NumPy arrays holds no image memclean reads: every verb fails before any work,
    saying what the folder does hold; so do an empty Parquet file and a list of no paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "arrays"
    shards.mkdir()
    for k in range(3):
        (shards / f"{k:05d}.npy").write_bytes(b"x")
    (shards / "stats.json").write_text("{}")
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    (tmp_path / "none.txt").write_text("# nothing\n\n")
    out = tmp_path / ("o.parquet" if verb == "score" else "out")
    model = [] if verb in ("dedup", "train") else ["--model", str(zero_model)]
    for data, words in ((shards, "3 .npy files (NumPy arrays?)"), (tmp_path / "empty.parquet", "no rows"),
                        (tmp_path / "none.txt", "names no path")):
        rc = main([verb, "--data", str(data), "--out", str(out), *model])
        assert rc == 2 and words in capsys.readouterr().err, (verb, data)
        assert not out.exists()


@pytest.mark.parametrize("verb", ["score", "clean", "dedup", "train"])
def test_a_gpu_this_torch_cannot_see_fails_every_verb_cleanly(tmp_path, zero_model, write_images, verb,
                                                               monkeypatch, capsys):
    """--device cuda where torch sees no CUDA device (stubbed, so that it runs on any machine) is
    one line on stderr and exit 2 from every verb, never a traceback, and no output is left."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_images(n=2)
    out = tmp_path / ("o.parquet" if verb == "score" else "out")
    model = [] if verb in ("dedup", "train") else ["--model", str(zero_model)]
    extra = ["--sample-size", "8", "--channels", "1", "--steps", "1"] if verb == "train" else []
    rc = main([verb, "--data", str(data), "--out", str(out), *model, *extra, "--device", "cuda"])
    assert rc == 2 and "sees no CUDA device" in capsys.readouterr().err
    assert not out.exists()
