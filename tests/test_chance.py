"""The duplicate threshold judged against chance (decide/chance.py): the Gumbel fit, trimming of
copies, the floor, the sample, the nearest-neighbour search, and known answers on planted sets."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from memclean.cli import main
from pipeline.decide.chance import (MIN_SAMPLE, chance_threshold, gumbel_fit, gumbel_quantile, sample_rows,
                                    threshold_by_chance)
from pipeline.decide.clusters import find_clusters
from pipeline.decide.embeddings import PixelEmbedder
from pipeline.decide.index import build_index, search_views
from pipeline.decide.neighbours import nearest_similarity
from pipeline.io.data import ImageSpec, batched, discover
from tests.planted import planted_set

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"


def gumbel_draws(mu: float, beta: float, n: int, seed: int = 0) -> np.ndarray:
    """Similarities whose Fisher z follows the Gumbel law for maxima (mu, beta)."""
    return np.tanh(np.random.default_rng(seed).gumbel(mu, beta, n))


def quantile_se(mu: float, beta: float, p: float, n: int) -> float:
    """The standard error of the sample p quantile of n Gumbel draws: sqrt(p(1-p)/n) / f(x_p)."""
    x = (-np.log(-np.log(p)))
    density = np.exp(-x - np.exp(-x)) / beta
    return float(np.sqrt(p * (1 - p) / n) / density)


def test_the_fit_recovers_a_gumbel_law_and_its_tail():
    """mu and beta come from the quartile and the median: each is off by a few standard errors of
    those sample quantiles (n = 20,000), and the 0.995 quantile by beta's error times its
    distance (in betas) from the median, plus mu's."""
    mu, beta, n = 1.8, 0.25, 20000
    m, b = gumbel_fit(gumbel_draws(mu, beta, n))
    se = max(quantile_se(mu, beta, 0.25, n), quantile_se(mu, beta, 0.5, n))
    beta_se = 2 * se / 0.693  # the two quantiles' spacing is 0.693 beta
    assert abs(b - beta) < 5 * beta_se and abs(m - mu) < 5 * (se + 0.37 * beta_se)
    z = mu - beta * np.log(-np.log(0.995))
    bound = 5 * (se + 0.37 * beta_se) + 5 * beta_se * 5.3  # -ln(-ln .995) = 5.3
    assert abs(np.arctanh(gumbel_quantile(m, b, 0.995)) - z) < bound


def test_copies_are_trimmed_from_the_chance_sample():
    """Up to half of the draws being copies (similarity near 1) leaves the threshold where the
    chance draws alone put it: the copies sit above it and are trimmed away."""
    chance = gumbel_draws(1.2, 0.2, 600, seed=1)
    copies = 1 - np.random.default_rng(2).uniform(1e-6, 1e-4, 400)
    alone = chance_threshold(chance, 0.005, -1, "dataset")
    mixed = chance_threshold(np.r_[chance, copies], 0.005, -1, "dataset")
    assert mixed.value == pytest.approx(alone.value, abs=1e-9) and mixed.sample == alone.sample <= 600
    assert mixed.draws == 1000 and mixed.quantiles["1"] > 0.9999
    # and the rate is what it says on draws from the law itself: about 0.5% of fresh chance draws
    # reach it (the fit from 600 draws is itself uncertain: within a factor of 3)
    fresh = gumbel_draws(1.2, 0.2, 200000, seed=3)
    assert 0.005 / 3 < (fresh >= alone.value).mean() < 0.005 * 3


def test_the_floor_flat_images_and_too_few_draws():
    low = gumbel_draws(0.3, 0.1, 500)  # unrelated images that barely correlate
    t = chance_threshold(low, 0.005, 0.9, "reference")
    assert t.fitted < 0.9 and t.value == 0.9 and t.source == "reference"
    flat = np.full(300, -1.0)  # the pixel embedder's flat images: no draws at all
    t = chance_threshold(np.r_[flat, low[:MIN_SAMPLE - 1]], 0.005, 0.9, "dataset", default=0.95)
    assert t.value == 0.95 and t.fitted is None and "fewer than" in t.note and t.draws == MIN_SAMPLE - 1


def test_the_sample_is_one_row_per_hash_whatever_the_order():
    keys = [f"{k:064x}" for k in np.random.default_rng(0).integers(0, 2**62, 50)]
    rows = keys + keys[:10] + [None]  # ten repeated, one null
    chosen = sample_rows(rows, 20)
    assert len(chosen) == 20 and len({rows[r] for r in chosen}) == 20
    assert sorted(rows[r] for r in chosen) == sorted(set(keys))[:20]
    reversed_rows = rows[::-1]
    assert sorted(reversed_rows[r] for r in sample_rows(reversed_rows, 20)) == sorted(rows[r] for r in chosen)


def embed(root: Path, side: int, channels: int):
    decoded = [d for b in batched(discover(str(root)), ImageSpec(channels, (side, side)), 256) for d in b]
    emb = PixelEmbedder(image_side=side)
    v = emb(torch.stack([d.pixels for d in decoded])).numpy()
    return [Path(d.item.id).name for d in decoded], v, [d.pixel_sha256 for d in decoded], emb


def test_nearest_similarity_is_the_exact_best_other_image(tmp_path):
    """With every image a candidate, the nearest similarity is the brute-force maximum of the
    embedder's similarity over the images with other pixels (the same arithmetic: exact)."""
    planted_set(tmp_path, n_unique=30, n_groups=3, seed=4)
    ids, v, keys, emb = embed(tmp_path, 64, 3)
    views = search_views(v, emb.search_view)
    row, sim = nearest_similarity(v, keys, build_index(views), v, keys, emb, candidates=len(v), query_views=views)
    for i in range(len(v)):
        others = [j for j in range(len(v)) if keys[j] != keys[i]]
        s = emb.similarity(np.repeat(v[i:i + 1], len(others), 0), v[others])
        assert sim[i] == s.max() and keys[row[i]] != keys[i]


def planted_groups() -> dict[str, int]:
    rows = csv.DictReader(open(DIGITS / "planted.csv"))
    return {r["file"].split("/", 1)[1]: int(r["group"]) for r in rows}


def test_digits_auto_finds_the_planted_groups_and_a_contaminated_reference():
    """On the demo's digits, chance measured on the held-out digits puts the threshold where the
    clusters are exactly the 16 planted groups (at 0.95 the digits join by the thousands:
    benchmarks/dup_threshold.py). Training digits copied into the reference are reported as
    contamination, each with the training image it copies, and left out of the threshold."""
    ids, v, keys, emb = embed(DIGITS / "train", 16, 1)
    ref_ids, ref, _, _ = embed(DIGITS / "heldout", 16, 1)
    views = search_views(v, emb.search_view)
    index = build_index(views)
    t = threshold_by_chance(v, keys, index, views, emb, 0.005, ref, ref_ids, ids)
    assert t.source == "reference" and t.contaminated == [] and 0.9 <= t.value < 1
    c = find_clusters(v, keys, np.zeros(len(ids)), ids, t.value, emb, index=index, views=views)
    truth = planted_groups()
    found = {}
    for i, name in enumerate(ids):
        if c.cluster[i] >= 0:
            found.setdefault(int(c.cluster[i]), set()).add(name)
    expected = {}
    for name, g in truth.items():
        expected.setdefault(g, set()).add(name)
    assert sorted(map(sorted, found.values())) == sorted(map(sorted, expected.values()))

    copied = [ids.index(n) for n in ("u0003.png", "u0100.png", "e00_c00.png")]
    t2 = threshold_by_chance(v, keys, index, views, emb, 0.005, np.r_[ref, v[copied]],
                             ref_ids + ["copy_a", "copy_b", "copy_c"], ids)
    assert {d["reference"] for d in t2.contaminated} == {"copy_a", "copy_b", "copy_c"}
    assert {d["training"] for d in t2.contaminated if d["reference"] != "copy_c"} == {"u0003.png", "u0100.png"}
    assert t2.value == pytest.approx(t.value, abs=1e-9) and t2.to_dict()["contaminated_reference"] == 3


def test_dedup_at_auto_on_planted_scenes_finds_every_group(tmp_path):
    """`memclean dedup` with no threshold given, on generated scenes (25 planted groups of six:
    the original, an exact copy and four near copies): the threshold set by the dataset's own
    nearest neighbours (recorded in the manifest with the chance quantiles) gives exactly the
    planted groups."""
    truth = planted_set(tmp_path / "scenes", n_unique=150, n_groups=25, seed=5)
    assert main(["dedup", "--data", str(tmp_path / "scenes"), "--out", str(tmp_path / "out"),
                 "--image-size", "64"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    chosen = m["dedup"]["threshold_chosen"]
    import pyarrow.parquet as pq
    t = pq.read_table(tmp_path / "out" / "scores.parquet", columns=["id", "dup_cluster", "pixel_sha256"]).to_pylist()
    distinct = len({r["pixel_sha256"] for r in t})  # one draw per distinct picture (exact copies are one)
    assert chosen["mode"] == "auto" and chosen["source"] == "dataset" and chosen["draws"] == distinct
    assert set(chosen["quantiles"]) == {"0.5", "0.9", "0.99", "1"} and m["dedup"]["threshold"] == chosen["value"]
    groups = {}
    for r in t:
        if r["dup_cluster"] is not None:
            groups.setdefault(r["dup_cluster"], set()).add(Path(r["id"]).name)
    expected = {}
    for name, g in truth.items():
        if g >= 0:
            expected.setdefault(g, set()).add(name)
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, expected.values()))


def test_a_threshold_read_back_from_a_manifest_is_the_one_written():
    """ChanceThreshold.from_dict(to_dict()) (what verify --from reads of a clean run's manifest)."""
    rng = np.random.default_rng(0)
    t = chance_threshold(np.tanh(rng.gumbel(1.5, 0.2, 500)), 0.005, 0.9, "dataset")
    t.contaminated = [{"reference": "r1", "dataset": "d7", "similarity": 0.99}]
    back = json.loads(json.dumps(t.to_dict()))  # as the manifest stores it
    assert type(t).from_dict(back).to_dict() == t.to_dict()
