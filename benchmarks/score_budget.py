"""Two choices behind the default score, measured (issue 24): how many noises the denoising loss
needs, and whether V over a window [t0, 1] is better taken from a solve started at the noised
image x_t0 = alpha(t0) x + sigma(t0) eps than from the image's own solve.

    .venv/bin/python benchmarks/score_budget.py [--sets digits digits2 photos] [--no-write]

Sets: the demo digits with the shipped model, issue 25's second digits set with its own model
(made by benchmarks/acceptance.py under --cache; skipped when it is not there) and the photo
evidence set with examples/photo-model. Every member and held-out image is scored twice (seeds 0
and 1); the held-out images are halved at random as benchmarks/scores.py halves them (the first
half the reference the calibration is fitted on, the second the held-out side of the AUCs).

1. The loss at the default time over 4, 8, 16 (the default) and 32 noises, judged as the default
   score (calibrated_denoising_score): AUC members vs held-out and duplicated vs unique, the
   Spearman between seeds, network passes per image.
2. V over [t0, 1], t0 the window's default start (the first grid time at or after
   --window-start): from the same solve (the window column, free) against a solve of its own from x_t0 (one seeded noise, the default 8 Heun
   steps over [t0, 1]: as many passes again as V), AUCs, Spearman with complexity among the
   evaluation half of the held-out images, and between seeds.
3. Ways to need fewer noises (the loss's 16 forward passes are what puts the default above V
   alone; issue 24's cost bound): at 8, 12 and 16 noises, the default noises (independent per
   image) against noises shared by every image of the run (common random numbers: the
   differences between images, which are all a ranking reads, lose what the noises have in
   common), antithetic pairs (e, -e) and the loss at other times, each judged as
   calibrated_denoising_score; the noise counts are prefixes of one draw of 16.
Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.acceptance import SETS  # noqa: E402
from benchmarks.results import hardware, publish  # noqa: E402
from benchmarks.scores import images, planted_ids  # noqa: E402
from pipeline.decide.scores import calibrate, judged  # noqa: E402
from pipeline.score.complexity import complexity  # noqa: E402
from pipeline.score.loss import denoising_loss, loss_noises, per_noise_losses  # noqa: E402
from pipeline.score.models import load_model  # noqa: E402
from pipeline.score.probes import image_key  # noqa: E402
from pipeline.score.scoring import image_spec  # noqa: E402
from pipeline.score.volume import ScorerSettings, log_volume_growth, time_grid  # noqa: E402
from pipeline.tools.evaluate import roc_auc  # noqa: E402

NOISES = (4, 8, 16, 32)
DESIGN_NOISES = (8, 12, 16)  # prefixes of one draw of DESIGNS_DRAWN
DESIGNS_DRAWN = 16
OTHER_TIMES = (0.05, 0.2)
BATCH = 64


def evidence_set(name: str, cache: Path) -> tuple[Path, Path, set[str]] | None:
    """(model, data folder with train/ and heldout/, the duplicated members' file names)."""
    if name == "digits2":
        truth = cache / "digits2-truth.json"
        if not (cache / "digits2-model" / "model_index.json").exists() or not truth.exists():
            return None
        return cache / "digits2-model", cache / "digits2", {k for k, g in json.loads(truth.read_text()).items()
                                                             if g != -1}
    data, model = SETS[name]
    return model, data, planted_ids(data)


def batches(x: torch.Tensor):
    for s in range(0, len(x), BATCH):
        yield x[s:s + BATCH]


def loss_scores(model, z: torch.Tensor, noises: int, seed: int) -> np.ndarray:
    settings = ScorerSettings()
    return np.concatenate([denoising_loss(model.score_fn, zb, settings.loss_t, noises, seed,
                                          [image_key(seed, im) for im in zb]).denoising_loss.numpy()
                           for zb in batches(z)])


def design_noises(design: str, zb: torch.Tensor, seed: int) -> torch.Tensor:
    """DESIGNS_DRAWN noises for a batch [n, B or 1, ...]: independent per image (the library's),
    shared by every image (one key from the seed alone), or antithetic pairs e, -e of the first half."""
    if design == "shared":
        return loss_noises(zb[:1], DESIGNS_DRAWN, seed, keys=[seed])  # the loss's own keying, of the seed alone
    keys = [image_key(seed, im) for im in zb]
    if design == "antithetic":
        half = loss_noises(zb, DESIGNS_DRAWN // 2, seed, keys)
        return torch.stack([half, -half], 1).flatten(0, 1)  # e0, -e0, e1, -e1, ...: a prefix keeps whole pairs
    return loss_noises(zb, DESIGNS_DRAWN, seed, keys)


def design_rows(name: str, model, z: torch.Tensor, judge, aucs, comp: np.ndarray, ev: np.ndarray) -> list[list[str]]:
    """Table 3: each noise design (and other times) at DESIGN_NOISES noises."""
    t_default = ScorerSettings().loss_t
    arms = [("independent per image (default)", "independent", t_default), ("shared by every image", "shared", t_default),
            ("antithetic pairs", "antithetic", t_default)] + [(f"independent, t = {t}", "independent", t)
                                                               for t in OTHER_TIMES]
    rows = []
    for label, design, t in arms:
        per = [np.concatenate([per_noise_losses(model.score_fn, zb, t, design_noises(design, zb, seed)).numpy()
                               for zb in batches(z)], axis=1) for seed in (0, 1)]  # [n, images] each
        for n in DESIGN_NOISES:
            a, b = (judge(p[:n].mean(0)) for p in per)
            rows.append([name, label, str(n), *aucs(a), f"{spearmanr(a, b)[0]:.3f}",
                         f"{spearmanr(a[ev], comp[ev])[0]:+.2f}"])
            print(rows[-1], flush=True)
    return rows


def noised_window(model, z: torch.Tensor, t0: float, seed: int) -> np.ndarray:
    """V over [t0, 1] solved from x_t0 = alpha(t0) x + sigma(t0) eps (eps seeded per image)."""
    schedule = model.score_fn.schedule
    tt = torch.tensor(t0, dtype=torch.float64)
    alpha, sigma = float(torch.exp(schedule.log_alpha(tt))), float(schedule.sigma(tt))
    out = []
    for zb in batches(z):
        eps = torch.stack([torch.randn(im.shape, generator=torch.Generator().manual_seed(image_key(seed + 7, im)
                                                                                        % 2**63))
                           for im in zb])
        xt = (alpha * zb.double() + sigma * eps.double()).to(zb.dtype)
        out.append(log_volume_growth(model.score_fn, xt, ScorerSettings(seed=seed, eps=t0, window_start=t0)).log_volume_growth.numpy())
    return np.concatenate(out)


def measure(name: str, model_dir: Path, data: Path, dup_names: set[str]) -> list[list[str]]:
    model = load_model(model_dir)
    spec = image_spec(model)
    member_ids, xm = images(data / "train", spec)
    held_ids, xh = images(data / "heldout", spec)
    x = torch.cat([xm, xh])
    with torch.no_grad():
        z = model.prepare(x)
    n_m = len(member_ids)
    dup = np.array([Path(i).name in dup_names for i in member_ids])
    order = np.random.default_rng(0).permutation(len(held_ids))
    ref, ev = n_m + np.sort(order[: len(order) // 2]), n_m + np.sort(order[len(order) // 2:])
    members = np.arange(n_m)
    comp = np.array([complexity(im, model.data_range) for im in x])
    nan = np.full(len(x), np.nan)

    def aucs(s: np.ndarray) -> list[str]:
        return [f"{roc_auc(s[members], s[ev]):.3f}", f"{roc_auc(s[members][dup], s[members][~dup]):.3f}"]

    def judge(loss: np.ndarray) -> np.ndarray:
        """calibrated_denoising_score of a loss column (the fit on the reference half)."""
        cols = {"log_volume_growth": nan, "denoising_loss": loss, "denoising_loss_se": nan, "complexity": comp}
        return judged(cols, "calibrated_denoising_score", calibrate({k: v[ref] for k, v in cols.items()},
                                                                    "reference"))[0]

    rows_loss = []
    for n in NOISES:
        t0 = time.perf_counter()
        runs = [judge(loss_scores(model, z, n, seed)) for seed in (0, 1)]
        per_s = 2 * len(x) / (time.perf_counter() - t0)
        rows_loss.append([name, str(n), *aucs(runs[0]), f"{spearmanr(runs[0], runs[1])[0]:.3f}", str(n),
                          f"{per_s:.1f}"])
        print(rows_loss[-1], flush=True)

    settings = ScorerSettings()
    grid = time_grid(model.score_fn.schedule, settings).numpy()
    starts = [float(grid[int(np.searchsorted(grid, settings.window_start))])]  # the window's default start
    same = {seed: np.concatenate([log_volume_growth(model.score_fn, zb, dataclasses.replace(settings, seed=seed))
                                  .profile[1].T.numpy() for zb in batches(z)]) for seed in (0, 1)}
    rows_win = []
    for t0 in starts:
        j = int(np.searchsorted(grid, t0))
        a, b = same[0][:, j], same[1][:, j]
        rows_win.append([name, f"{t0:.4g}", "same solve", *aucs(a), f"{spearmanr(a[ev], comp[ev])[0]:+.2f}",
                         f"{spearmanr(a, b)[0]:.3f}", "0 (in V's solve)"])
        print(rows_win[-1], flush=True)
        t1 = time.perf_counter()
        a, b = noised_window(model, z, t0, 0), noised_window(model, z, t0, 1)
        per_s = 2 * len(x) / (time.perf_counter() - t1)
        rows_win.append([name, f"{t0:.4g}", "own solve from x_t0", *aucs(a), f"{spearmanr(a[ev], comp[ev])[0]:+.2f}",
                         f"{spearmanr(a, b)[0]:.3f}", f"{2 * settings.steps} forward + backward ({per_s:.1f} images/s)"])
        print(rows_win[-1], flush=True)
    return [rows_loss, rows_win, design_rows(name, model, z, judge, aucs, comp, ev)]


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |"
                                                                                   for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/memclean-bench")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    loss_rows, win_rows, design, skipped = [], [], [], []
    for name in args.sets:
        found = evidence_set(name, args.cache)
        if found is None:
            skipped.append(name)
            continue
        a, b, c = measure(name, *found)
        loss_rows += a
        win_rows += b
        design += c
    text = (f"Regenerate: `.venv/bin/python benchmarks/score_budget.py` ({time.time() - t0:.0f} s; {hardware()}). "
            "Seeds 0 and 1; the reference half of the held-out images fits the calibration, the other half is the "
            "held-out side of the AUCs." + (f" Not run (no model under --cache): {', '.join(skipped)}." if skipped
                                            else "") +
            f"\n\n### The loss's noises (judged as calibrated_denoising_score, t = {ScorerSettings().loss_t})\n\n"
            + table(["set", "noises", "AUC members vs held-out", "AUC duplicated vs unique", "Spearman seed 0 vs 1",
                     "forward passes per image", "images/s (loss alone)"], loss_rows)
            + "\n\n### V over [t0, 1]: the same solve, or a solve of its own from the noised image\n\n"
            + table(["set", "t0", "how", "AUC members vs held-out", "AUC duplicated vs unique",
                     "Spearman with complexity (held-out)", "Spearman seed 0 vs 1", "extra passes per image"],
                    win_rows)
            + f"\n\n### Fewer noises: shared or antithetic noises, other times (calibrated_denoising_score; the "
            f"counts are prefixes of one draw of {DESIGNS_DRAWN})\n\n"
            + table(["set", "noises", "count", "AUC members vs held-out", "AUC duplicated vs unique",
                     "Spearman seed 0 vs 1", "Spearman with complexity (held-out)"], design))
    publish("score-budget", "The loss's noises and V's window: `benchmarks/score_budget.py`", text,
            write=not args.no_write)


if __name__ == "__main__":
    main()
