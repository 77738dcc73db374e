"""memclean verify: the generations that copy training pictures, end to end (run/verify.py)."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memclean.cli import main
from pipeline.score.models import load_model
from pipeline.score.sampling import SampleSettings, sampling_key

REPO = Path(__file__).resolve().parent.parent


def verify(*args) -> int:
    return main(["verify", *map(str, args)])


TINY = ["--min-size", "4"]  # the 4x4 images below are the zero model's own size


def test_the_demo_model_copies_what_the_benchmark_counts(tmp_path):
    """On the bundled demo, verify finds the same copying generations and the same copied pictures
    as the benchmarks' count (evaluate.memorized over evaluate.generate, with the planted groups
    as pictures: an independent brute-force implementation), from its own duplicate clusters."""
    from benchmarks.evidence import flat, load_pipeline, planted_groups
    from pipeline.io.data import ImageSpec
    from pipeline.tools.evaluate import generate, memorized

    data, model = REPO / "examples" / "digits" / "train", REPO / "examples" / "model"
    n = 60
    assert verify("--model", model, "--data", data, "--out", tmp_path / "v", "--generations", n,
                  "--cache-dir", tmp_path / "cache") == 0
    gens = pq.read_table(tmp_path / "v" / "generations.parquet").to_pylist()
    unet, scheduler = load_pipeline(model)
    ids, x = flat(str(data), ImageSpec(1, (16, 16)))
    truth = memorized(generate(unet, dict(scheduler.config), n).flatten(1).numpy(), x.flatten(1).numpy(),
                      groups=planted_groups(data, ids))
    assert truth["count"] > 5  # the demo model copies: the comparison has something to find
    assert [g["copy"] for g in gens] == truth["mask"].tolist()
    copied = pq.read_table(tmp_path / "v" / "copied.parquet").to_pylist()
    assert sorted(r["id"] for r in copied) == sorted(ids[i] for i in truth["copied_train_rows"])
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert m["copies"]["generations"] == truth["count"] and m["copies"]["copied_pictures"] == truth["copied_images"]
    lo, hi = m["copies"]["interval95"]
    assert lo < truth["count"] / n < hi and m["flags"] is None
    # every generation is an image datasets decodes: PNG bytes in the Hugging Face Image layout
    assert Image.open(__import__("io").BytesIO(gens[0]["image"]["bytes"])).size == (16, 16)
    assert b"huggingface" in pq.read_schema(tmp_path / "v" / "generations.parquet").metadata
    assert (tmp_path / "v" / "report.html").read_text().count("generation(s)") == m["copies"]["copied_pictures"] \
        or m["copies"]["copied_pictures"] > 48


@pytest.fixture
def small(tmp_path, write_images, zero_model):
    """12 random 4x4 RGB training images, two more exact copies of the first, and the zero model."""
    root = write_images(12, (4, 4), "RGB", "train", seed=1)
    for k in range(2):
        (root / f"copy{k}.png").write_bytes((root / "img000.png").read_bytes())
    return root, zero_model


def plant(model_path, cache: Path, generations: np.ndarray, steps: int = 50, seed: int = 0) -> None:
    """Generations put in the cache where verify looks for what it sampled before (by the model's
    fingerprint, steps and seed): a model whose generations are known."""
    key = sampling_key(load_model(model_path).fingerprint, SampleSettings(generations=len(generations),
                                                                          sample_steps=steps, sample_seed=seed))
    folder = cache / "generations" / key
    folder.mkdir(parents=True)
    np.save(folder / "block-000000.npy", generations.astype(np.float32))


def train_pixels(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / name), np.float32).transpose(2, 0, 1) / 127.5 - 1


def test_planted_copies_are_found_and_copies_of_one_picture_count_once(small, tmp_path, capsys):
    root, model = small
    rng = np.random.default_rng(5)
    a, b, c = train_pixels(root, "img000.png"), train_pixels(root, "img003.png"), train_pixels(root, "img007.png")
    generations = np.stack([a, b + 0.01 * rng.normal(size=b.shape), (b + c) / 2, rng.uniform(-1, 1, a.shape)])
    plant(model, tmp_path / "cache", generations)
    held = tmp_path / "held"  # held-out images: three new ones and, by mistake, a copy of a training image
    held.mkdir()
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(held / f"h{k}.png")
    (held / "leak.png").write_bytes((root / "img005.png").read_bytes())
    assert verify("--model", model, "--data", root, "--out", tmp_path / "v", "--generations", 4,
                  "--cache-dir", tmp_path / "cache", "--reference", held, *TINY) == 0
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    gens = pq.read_table(tmp_path / "v" / "generations.parquet").to_pylist()
    assert [g["copy"] for g in gens] == [True, True, False, False]
    assert gens[0]["distance"] == pytest.approx(0, abs=1e-3) and gens[1]["nearest_id"] == "img003.png"
    # img000 and its two exact copies are one picture: copied once, three training images
    assert m["copies"]["copied_pictures"] == 2 and m["copies"]["copied_images"] == 4
    copied = {r["id"]: r for r in pq.read_table(tmp_path / "v" / "copied.parquet").to_pylist()}
    assert set(copied) == {"img000.png", "copy0.png", "copy1.png", "img003.png"}
    assert copied["copy0.png"]["picture"] == copied["img000.png"]["picture"] != copied["img003.png"]["picture"]
    assert m["sampling"]["cached"] == 4 and m["sampling"]["fresh"] == 0  # read back, not sampled again
    # the test's false-copy rate on this data: only the leaked held-out image passes it
    assert {k: m["copies"]["held_out"][k] for k in ("images", "passing")} == {"images": 4, "passing": 1}
    assert "2 pictures copied" in capsys.readouterr().out


def test_a_model_that_copies_nothing_finds_nothing(small, tmp_path):
    """A zero network's generations (noise scaled and clamped: +-1 patterns) are no training
    image's copy: each is about as far from its nearest as from the next (ratio near 1)."""
    root, model = small
    assert verify("--model", model, "--data", root, "--out", tmp_path / "v", "--generations", 20,
                  "--sample-steps", 5, "--no-cache", *TINY) == 0
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    ratios = [g["ratio"] for g in pq.read_table(tmp_path / "v" / "generations.parquet").to_pylist()]
    assert m["copies"]["generations"] == 0 and min(ratios) > 1 / 3
    assert pq.read_table(tmp_path / "v" / "copied.parquet").num_rows == 0


def test_flags_of_a_clean_run_held_against_the_copies(small, tmp_path):
    root, model = small
    assert main(["clean", "--data", str(root), "--model", str(model), "--out", str(tmp_path / "c"), "--steps", "2",
                 "--flag-quantile", "0.5", "--action", "none", *TINY]) == 0
    a = train_pixels(root, "img000.png")
    plant(model, tmp_path / "cache", np.stack([a, a + 0.01]))
    assert verify("--model", model, "--data", root, "--out", tmp_path / "v", "--generations", 2,
                  "--cache-dir", tmp_path / "cache", "--from", tmp_path / "c", *TINY) == 0
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    copied = pq.read_table(tmp_path / "v" / "copied.parquet").to_pylist()
    scores = {r["id"]: r for r in pq.read_table(tmp_path / "c" / "scores.parquet").to_pylist()}
    assert {r["id"] for r in copied} == {"img000.png", "copy0.png", "copy1.png"}
    assert all(r["flagged"] == scores[r["id"]]["flagged"] and r["action"] == scores[r["id"]]["action"] for r in copied)
    f = m["flags"]
    assert f["copied_images"] == 3 and f["recall"] == pytest.approx(np.mean([r["flagged"] for r in copied]))
    others = [r["flagged"] for i, r in scores.items() if i not in {c["id"] for c in copied}]
    assert f["flag_rate_not_copied"] == pytest.approx(np.mean(others))
    assert f["judged"] == json.loads((tmp_path / "c" / "manifest.json").read_text())["threshold"]["score"]


def test_hostile_and_missing_inputs_are_clear_errors(small, tmp_path, capsys, write_images):
    root, model = small
    common = ["--model", model, "--generations", 2, "--sample-steps", 2, "--no-cache", *TINY]
    assert verify(*common, "--data", root, "--out", tmp_path / "a", "--from", root) == 2
    assert "not a finished memclean clean output" in capsys.readouterr().err
    assert verify(*common, "--data", root, "--out", tmp_path / "a", "--copy-ratio", 0) == 2
    assert "--copy-ratio" in capsys.readouterr().err
    assert verify(*common, "--data", root, "--out", tmp_path / "a", "--against", root) == 2
    assert "--against" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"not an image")
    assert verify(*common, "--data", empty, "--out", tmp_path / "a") == 2
    assert "no training image could be decoded" in capsys.readouterr().err
    assert verify(*common, "--data", root, "--out", tmp_path / "a", "--model", tmp_path / "nowhere") == 2
    assert not (tmp_path / "a").exists()  # nothing half-written
    other = write_images(3, (4, 4), "RGB", "other", seed=9)
    assert main(["clean", "--data", str(other), "--model", str(model), "--out", str(tmp_path / "c"), "--steps", "2",
                 "--action", "none", *TINY]) == 0
    capsys.readouterr()
    assert verify(*common, "--data", root, "--out", tmp_path / "a", "--from", tmp_path / "c") == 2
    assert "was it run on this --data" in capsys.readouterr().err


def test_a_clean_output_as_data_stands_for_its_original_training_set(small, tmp_path):
    """`verify --model RETRAINED --data CLEANED_OUT`: the copies are counted against the images
    the clean run started from (the closed loop), with that run as --from."""
    root, model = small
    assert main(["clean", "--data", str(root), "--model", str(model), "--out", str(tmp_path / "c"), "--steps", "2",
                 "--action", "none", *TINY]) == 0
    a = train_pixels(root, "img003.png")
    plant(model, tmp_path / "cache", np.stack([a, -a]))
    runs = {"direct": ["--data", root, "--from", tmp_path / "c"], "out": ["--data", tmp_path / "c"]}
    got = {}
    for name, args in runs.items():
        assert verify("--model", model, *args, "--out", tmp_path / name, "--generations", 2,
                      "--cache-dir", tmp_path / "cache", *TINY) == 0
        got[name] = json.loads((tmp_path / name / "manifest.json").read_text())
    assert got["out"]["copies"] == got["direct"]["copies"] and got["out"]["flags"] == got["direct"]["flags"]
    assert got["out"]["training"]["from_clean_output"] and not got["direct"]["training"]["from_clean_output"]
    assert got["out"]["copies"]["copied_images"] == 1


def test_clean_flags_what_verify_found_copied(small, tmp_path, capsys):
    """memclean clean --flag-copied VERIFY_OUT flags the copied images whatever their score."""
    root, model = small
    a, b = train_pixels(root, "img000.png"), train_pixels(root, "img003.png")
    plant(model, tmp_path / "cache", np.stack([a, b]))
    assert verify("--model", model, "--data", root, "--out", tmp_path / "v", "--generations", 2,
                  "--cache-dir", tmp_path / "cache", *TINY) == 0
    clean = ["clean", "--data", str(root), "--model", str(model), "--steps", "2", "--action", "none",
             "--flag-threshold", "1e9", *TINY]  # no score reaches the threshold: only the copies are flagged
    assert main([*clean, "--out", str(tmp_path / "c"), "--flag-copied", str(tmp_path / "v")]) == 0
    rows = pq.read_table(tmp_path / "c" / "scores.parquet").to_pylist()
    flagged = {r["id"] for r in rows if r["flagged"]}
    assert flagged == {"img000.png", "copy0.png", "copy1.png", "img003.png"}
    assert all("copied by 1 generation(s)" in r["flag_reason"] for r in rows if r["flagged"])
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["threshold"]["details"]["flag_copied"]["flagged_by_copy_only"] == 4 and m["counts"]["flagged"] == 4
    capsys.readouterr()
    assert main([*clean, "--out", str(tmp_path / "c2"), "--flag-copied", str(tmp_path / "c")]) == 2
    assert "not a finished memclean verify output" in capsys.readouterr().err


def test_a_clean_outputs_embeddings_index_and_threshold_are_reused(small, tmp_path):
    """With --from, the similarity test takes the clean run's embeddings (the images it holds
    unchanged; an augmented row's vector is its variant's, so that image is embedded again), its
    index.faiss and its threshold, and gives the similarities a run that embeds everything gives.
    Embeddings that are not this embedder's (tampered here) are caught and every image embedded."""
    import shutil

    import pyarrow as pa

    root, model = small
    clean_args = ["clean", "--data", str(root), "--model", str(model), "--steps", "2", "--flag-quantile", "0.5",
                  "--action", "auto", *TINY]
    assert main([*clean_args, "--out", str(tmp_path / "c")]) == 0
    actions = [r["action"] for r in pq.read_table(tmp_path / "c" / "embeddings.parquet").to_pylist()]
    assert "augmented" in actions  # the case that must not be reused
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["dedup"]["index"]  # a search ran
    a = train_pixels(root, "img003.png")
    plant(model, tmp_path / "cache", np.stack([a, -a, a + 0.2]))
    without = tmp_path / "c-no-embeddings"  # the same clean output, less what verify could reuse
    shutil.copytree(tmp_path / "c", without)
    (without / "embeddings.parquet").unlink()
    tampered = tmp_path / "c-tampered"
    shutil.copytree(tmp_path / "c", tampered)
    t = pq.read_table(tampered / "embeddings.parquet")
    vectors = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))[:, ::-1].copy()  # unit, but not these
    t = t.set_column(2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()),
                                                                       vectors.shape[1]))
    pq.write_table(t, tampered / "embeddings.parquet")
    got = {}
    given = tmp_path / "c-given"  # a clean run whose threshold was given: judged by verify, not reused
    assert main([*clean_args, "--out", str(given), "--dup-threshold", "0.9"]) == 0
    for name, clean in {"reused": tmp_path / "c", "embedded": without, "tampered": tampered, "given": given}.items():
        assert verify("--model", model, "--data", root, "--from", clean, "--out", tmp_path / name,
                      "--generations", 3, "--cache-dir", tmp_path / "cache", *TINY) == 0
        got[name] = (json.loads((tmp_path / name / "manifest.json").read_text()),
                     pq.read_table(tmp_path / name / "generations.parquet").drop_columns(["image"]).to_pylist())
    m, gens = got["reused"]
    clean_dedup = json.loads((tmp_path / "c" / "manifest.json").read_text())["dedup"]
    reusable = len(actions) - actions.count("augmented")  # every decoded row but the augmented ones
    assert m["similar"]["search"] == {"from": str(tmp_path / "c"), "embeddings_reused": reusable,
                                      "embedded": 14 - reusable, "index": "reused", "threshold": "--from"}
    assert m["similar"]["threshold"]["value"] == clean_dedup["threshold"]
    assert got["embedded"][0]["similar"]["search"]["embedded"] == 14
    assert got["tampered"][0]["similar"]["search"]["embedded"] == 14
    assert got["tampered"][0]["similar"]["search"]["index"] == "built"
    judged_here = got["given"][0]["similar"]
    assert judged_here["search"]["threshold"] == "this run"
    assert judged_here["threshold"]["value"] == got["embedded"][0]["similar"]["threshold"]["value"]
    for name in ("embedded", "tampered", "given"):
        other = got[name][1]
        assert [g["similar_id"] for g in gens] == [g["similar_id"] for g in other]
        # the same embedder on the same pixels in batches of other sizes: unit vectors whose
        # inner products differ by float32 rounding over a few hundred terms (<< 1e-5)
        assert np.allclose([g["similarity"] for g in gens], [g["similarity"] for g in other], atol=1e-5, rtol=0)
        assert [g["copy"] for g in gens] == [g["copy"] for g in other]
    # at the same threshold, the same verdicts: the clean run's own (reused) against one judged
    # the same way from the same vectors (the tampered run keeps the clean run's threshold too)
    assert [g["similar"] for g in gens] == [g["similar"] for g in got["tampered"][1]]
    # an image changed since the clean run: embedded again, and the index (its row is the old
    # image's) is not reused
    changed = next(i for i, a in zip(pq.read_table(tmp_path / "c" / "embeddings.parquet").column("id").to_pylist(),
                                      actions) if a != "augmented")
    pixels = np.asarray(Image.open(root / changed)).copy()
    Image.fromarray(255 - pixels).save(root / changed)
    assert verify("--model", model, "--data", root, "--from", tmp_path / "c", "--out", tmp_path / "changed",
                  "--generations", 3, "--cache-dir", tmp_path / "cache", *TINY) == 0
    search = json.loads((tmp_path / "changed" / "manifest.json").read_text())["similar"]["search"]
    assert search["embeddings_reused"] == reusable - 1 and search["index"] == "built"


def test_the_flags_line_says_when_nothing_is_copied():
    """With no copied image there is no recall and no AUC: the line says so instead of printing
    an empty AUC list (as it did on a random-weight model whose generations copied nothing)."""
    from memclean.cli import flags_line

    none = {"recall": None, "flag_rate_not_copied": 0.379, "auc": {}}
    assert flags_line(none) == ("no training image is copied, so the clean run's flags cannot be held against "
                                "copies (it flagged 37.9% of the images)")
    some = {"recall": 0.5, "flag_rate_not_copied": 0.25, "auc": {"log_volume_growth": 0.75}}
    assert flags_line(some).endswith("(flag rate among the others: 25.0%); AUC copied vs not: log_volume_growth 0.750")
    every = {"recall": 1.0, "flag_rate_not_copied": None, "auc": {}}
    assert "others: -); AUC copied vs not: - (no image both scored and not copied)" in flags_line(every)
