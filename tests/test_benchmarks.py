"""The benchmarks' own helpers, whose figures RESULTS.md reports: a continued model's recipe, the
planted listing, the evidence sets' one table, the paired bootstrap, the loss's noise designs and
the cost benchmark's ratios.
Exact answers only (no tolerance: these are bookkeeping, exact sign flips or copies of float64
noises, and quotients of exact binary times, which IEEE division rounds alike on any machine)."""
import numpy as np
import torch

from benchmarks.acceptance import SETS, set_paths, write_planted
from benchmarks.cost import ARMS, passes, round_orders, summarize
from benchmarks.evidence import planted, planted_groups, runs_of, training_recipe
from benchmarks.score_budget import DESIGNS_DRAWN, design_noises, evidence_set
from benchmarks.scores import bootstrap_margin
from pipeline.score.loss import loss_noises


def test_a_continued_models_runs_come_first_to_last_with_each_command():
    first = {"command": "memclean train --steps 4", "settings": {"steps": 4}}
    second = {"command": "memclean train --steps 3 --init-from a", "init_from": first, "total_steps": 7}
    third = {"command": "memclean train --steps 2 --init-from b", "init_from": second, "total_steps": 9}
    assert runs_of(third) == [first, second, third] and runs_of(first) == [first]
    assert training_recipe(first) == "`memclean train --steps 4`"
    assert training_recipe(third) == ("`memclean train --steps 4`, then `memclean train --steps 3 --init-from a`, "
                                      "then `memclean train --steps 2 --init-from b` (9 steps in all)")


def test_planted_listing_reads_back_as_groups_with_kinds_and_sizes(tmp_path):
    truth = {"a.png": 0, "b.png": 0, "c.png": -1, "d.png": 1, "e.png": 1, "f.png": 1}
    write_planted(tmp_path / "planted.csv", truth, exact=range(1))
    got = planted(tmp_path / "train")
    assert got == {"a.png": {"group": 0, "kind": "exact", "copies": 2}, "b.png": {"group": 0, "kind": "exact", "copies": 2},
                   "d.png": {"group": 1, "kind": "near", "copies": 3}, "e.png": {"group": 1, "kind": "near", "copies": 3},
                   "f.png": {"group": 1, "kind": "near", "copies": 3}}
    # copies of one picture are one picture; a unique member is itself
    assert planted_groups(tmp_path / "train", ["a.png", "c.png", "e.png"]).tolist() == ["g0", "c.png", "g1"]


def _per_image(scores: dict[str, tuple[list, list]], dup: list[bool]) -> dict:
    return {"per_image": {k: {"members": m, "heldout": h} for k, (m, h) in scores.items()} | {"duplicated": dup}}


def test_the_paired_bootstrap_sees_no_margin_between_a_score_and_itself_and_a_sure_one():
    rng = np.random.default_rng(1)
    dup = [True] * 10 + [False] * 30
    noise = (rng.normal(size=40).tolist(), rng.normal(size=20).tolist())
    # perfect: duplicated above unique above held-out, so both AUCs are 1 in every resample
    perfect = (list(np.r_[np.arange(10) + 100.0, np.arange(30) + 50.0]), list(np.arange(20.0)))
    results = [_per_image({"a": perfect, "b": noise, "c": noise}, dup)]
    assert np.all(bootstrap_margin(results, "b", "c", resamples=50) == 0)
    margin = bootstrap_margin(results, "a", "b", resamples=50)
    assert margin.shape == (50,) and np.all(margin > 0)
    assert bootstrap_margin([{"table": {}}], "a", "b") is None  # an older --json without per-image scores


def test_the_loss_noise_designs():
    """independent: the library's noises; shared: one noise for every image; antithetic: e, -e."""
    z = torch.randn(3, 1, 4, 4)
    ind = design_noises("independent", z, 0)
    assert torch.equal(ind, loss_noises(z, DESIGNS_DRAWN, 0)) and not torch.equal(ind[:, 0], ind[:, 1])
    shared = design_noises("shared", z, 0)
    assert shared.shape == (DESIGNS_DRAWN, 1, 1, 4, 4) and torch.equal(shared, design_noises("shared", z[1:], 0))
    assert not torch.equal(shared, design_noises("shared", z, 1))
    anti = design_noises("antithetic", z, 0)
    assert anti.shape == ind.shape and torch.equal(anti[1::2], -anti[::2])
    assert torch.equal(anti[::2], loss_noises(z, DESIGNS_DRAWN // 2, 0))


def test_the_cost_benchmark_takes_each_rounds_own_ratio_and_counts_the_defaults_passes():
    # per-round ratios 1.5, 2.0, 1.2 (the rounds' V alone times differ: a machine that drifts)
    seconds = {"V alone": [2.0, 4.0, 5.0], "the loss alone": [1.0, 2.0, 1.0], "V and the loss": [3.0, 8.0, 6.0]}
    got = summarize(seconds, 128)
    assert got["ratio_median"] == 1.5 and got["ratio_min"] == 1.2 and got["ratio_max"] == 2.0
    assert got["loss_over_v"] == 0.5 and got["rounds"] == 3
    assert got["images_s"] == {"V alone": 32.0, "the loss alone": 128.0, "V and the loss": 21.333333333333332}
    assert round_orders(3) == [ARMS, ARMS[::-1], ARMS]
    # heun over 8 steps: 16 drift evaluations, each a forward and a backward; the loss: 16 forwards
    assert passes() == {"V alone": 32, "the loss alone": 16, "V and the loss": 48}


def test_every_benchmark_reads_the_evidence_sets_from_one_table(tmp_path):
    """acceptance.SETS is the one list: the shipped sets resolve to folders with train/ and
    heldout/ beside a diffusers checkpoint, whichever benchmark asks (digits2 is made under the
    cache, so only its absence is checked here: score_budget skips a set not made)."""
    from benchmarks import transforms_acceptance

    for name in ("digits", "photos"):
        data, model = set_paths(name, tmp_path, tmp_path)
        assert (data, model) == SETS[name] == transforms_acceptance.SETS[name]
        assert (data / "train").is_dir() and (data / "heldout").is_dir() and (model / "model_index.json").is_file()
        found = evidence_set(name, tmp_path)
        assert found[:2] == (model, data) and found[2] == set(planted(data / "train"))
    assert "digits2" in SETS and evidence_set("digits2", tmp_path) is None
