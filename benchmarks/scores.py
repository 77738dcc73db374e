"""Which score flagging should judge, measured: V, its window, V calibrated for complexity, the
denoising loss (the membership baseline), its calibrated form and their combination, side by
side in one process on the evidence sets; writes RESULTS.md's `scores` section.

    .venv/bin/python benchmarks/scores.py [--sets digits digits2 photos] [--extra NAME MODEL TRAIN HELDOUT]

Sets: `digits` (examples/digits with the shipped examples/model), `digits2` (issue 25's second
digits set and its own model, made once under --cache by benchmarks/acceptance.py's
second_digits: about ten minutes of training) and `photos` (examples/photos,
built by examples/make_photos.py from the photographs scikit-image and scikit-learn ship, with
examples/photo-model trained on its train/ by `memclean train`); `--extra` adds a model and
images that are no evidence set (no planted copies): only its run-to-run Spearman is measured.

Per set, every member and held-out image is scored as a clean run scores it (the library's
scorer at its defaults, score.scoring.fresh_scores and complexity), twice: seeds 0 and 1. The
held-out images are split in two at random: the first half is the run's reference (the
calibrations are fitted on it, and the threshold is its 0.95 quantile), the second half is the
held-out side of every AUC and of the Spearman with complexity, so both are out of sample.
Measured per score: ROC AUC members vs held-out and duplicated (planted copies) vs unique
members, TPR at 1% FPR, the worst of the two AUCs, |Spearman(score, complexity)| among held-out
images, Spearman between the two seeds over every image, and the share of the flagged members
in the plainest quartile of complexity. Also: V over [t, 1] for every time t of the solve's grid
(from the same solve), the loss at several times, the network passes per image and images/s of
the scorer with and without the loss in one process, and the model's memorized generations.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.acceptance import SETS, set_paths  # noqa: E402
from benchmarks.evidence import planted, planted_groups, training_recipe  # noqa: E402
from benchmarks.results import hardware, write_section  # noqa: E402
from pipeline.decide.scores import JUDGED, JudgeSettings, calibrate, judged  # noqa: E402
from pipeline.io.data import decode_item, discover  # noqa: E402
from pipeline.score.complexity import complexity  # noqa: E402
from pipeline.score.loss import denoising_loss  # noqa: E402
from pipeline.score.models import load_model  # noqa: E402
from pipeline.score.probes import image_key  # noqa: E402
from pipeline.score.scoring import image_spec, loss_images, score_images  # noqa: E402
from pipeline.score.volume import DEFAULT_LOSS_T, ScorerSettings  # noqa: E402
from pipeline.tools.evaluate import generate, memorized, roc_auc, tpr_at_fpr  # noqa: E402

LOSS_TIMES = (0.02, 0.05, 0.1, 0.2, 0.4)  # the loss's time, swept
BATCH = 64


def images(folder: Path, spec) -> tuple[list[str], torch.Tensor]:
    ds = [decode_item(i, spec) for i in discover(str(folder))]
    return [d.item.id for d in ds], torch.stack([d.pixels for d in ds])


def score_all(model, x: torch.Tensor, settings: ScorerSettings, device: str = "cpu",
              batch: int = BATCH) -> dict[str, np.ndarray]:
    """Every column a clean run keeps (and V's profile over window starts), batch by batch on `device`."""
    parts: dict[str, list] = {}
    for start in range(0, len(x), batch):
        xb = x[start:start + batch].to(device)
        v, loss = score_images(model, xb, settings), loss_images(model, xb, settings)
        cols = {"log_volume_growth": v.log_volume_growth, "log_volume_growth_se": v.log_volume_growth_se,
                "logp": v.logp, "window_volume_growth": v.window_volume_growth,
                "window_volume_growth_se": v.window_volume_growth_se, "denoising_loss": loss.denoising_loss,
                "denoising_loss_se": loss.denoising_loss_se, "profile": v.profile[1].T}
        for k, val in cols.items():
            parts.setdefault(k, []).append(val.detach().cpu().numpy())
        parts.setdefault("times", [v.profile[0].numpy()])
    out = {k: np.concatenate(v) if k != "times" else v[0] for k, v in parts.items()}
    out["complexity"] = np.array([complexity(image, model.data_range) for image in x])
    return out


def take(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: (v if k == "times" else v[rows]) for k, v in cols.items()}


def planted_ids(data: Path) -> set[str]:
    with open(data / "planted.csv", newline="") as f:
        return {r["file"].split("/", 1)[1] for r in csv.DictReader(f)}


def measure(name: str, model_dir: Path, data: Path, samples: int) -> dict:
    """Everything measured on one evidence set."""
    model = load_model(model_dir)
    spec = image_spec(model)
    member_ids, xm = images(data / "train", spec)
    held_ids, xh = images(data / "heldout", spec)
    dup = np.array([i in planted_ids(data) for i in member_ids])
    x = torch.cat([xm, xh])
    base = ScorerSettings()
    t0 = time.time()
    runs = [score_all(model, x, ScorerSettings(seed=seed)) for seed in (0, 1)]
    score_s = (time.time() - t0) / 2
    n_m = len(member_ids)
    order = np.random.default_rng(0).permutation(len(held_ids))
    ref, ev = n_m + np.sort(order[: len(order) // 2]), n_m + np.sort(order[len(order) // 2:])
    members = np.arange(n_m)
    cal = calibrate(take(runs[0], ref), "reference")
    cal1 = calibrate(take(runs[1], ref), "reference")
    table, per_image = {}, {}
    for score in JUDGED:
        v0, se0 = judged(runs[0], score, cal)
        per_image[score] = {"members": v0[members].tolist(), "heldout": v0[ev].tolist()}
        v1, _ = judged(runs[1], score, cal1)
        thr = np.quantile(v0[ref], 0.95)
        flagged = v0[members] > thr
        c_m = runs[0]["complexity"][members]
        share = float(np.mean(c_m[flagged] <= np.quantile(c_m, 0.25))) if flagged.any() else float("nan")
        table[score] = {
            "members_vs_heldout": roc_auc(v0[members], v0[ev]), "tpr_members": tpr_at_fpr(v0[members], v0[ev]),
            "dup_vs_unique": roc_auc(v0[members][dup], v0[members][~dup]),
            "tpr_dup": tpr_at_fpr(v0[members][dup], v0[members][~dup]),
            "rho_complexity": float(spearmanr(v0[ev], runs[0]["complexity"][ev])[0]),
            "rho_seeds": float(spearmanr(v0, v1)[0]), "flagged": int(flagged.sum()), "plainest_share": share,
            # the standard error each row reports (rms) against the spread between the seeds: the
            # two seeds' values differ by sqrt(2) sd per image (a calibrated score: the same fit for both)
            "rms_se": float(np.sqrt(np.nanmean(se0 ** 2))),
            "seed_sd": float(np.sqrt(np.nanmean((v0 - judged(runs[1], score, cal)[0]) ** 2) / 2))}
        table[score]["worst"] = min(table[score]["members_vs_heldout"], table[score]["dup_vs_unique"])
    prof = runs[0]["profile"]
    windows = [(float(t), roc_auc(prof[members, j], prof[ev, j]), roc_auc(prof[members, j][dup], prof[members, j][~dup]),
                float(spearmanr(prof[ev, j], runs[0]["complexity"][ev])[0]))
               for j, t in enumerate(runs[0]["times"][:-1])]
    losses = []
    for t in LOSS_TIMES:
        keys = [image_key(0, image) for image in x]
        L = np.concatenate([denoising_loss(model.score_fn, model.prepare(x[s:s + BATCH]), t, base.loss_noises, 0,
                                           keys[s:s + BATCH]).denoising_loss.numpy() for s in range(0, len(x), BATCH)])
        s = -np.log(L)
        losses.append((t, roc_auc(s[members], s[ev]), roc_auc(s[members][dup], s[members][~dup]),
                       float(spearmanr(s[ev], runs[0]["complexity"][ev])[0])))
    speed = throughput(model, x[:128])
    unet = model.score_fn.unet
    groups = planted_groups(data / "train", member_ids)
    mem = memorized(generate(unet, dict(json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())),
                             samples, seed=0).flatten(1).numpy(), xm.flatten(1).numpy(), groups=groups)
    plant = planted(data / "train")
    kinds = {f"g{p['group']}": f"group {p['group']} ({p['copies']} {p['kind']} copies)" for p in plant.values()}
    hits = Counter(groups[mem["nearest"][mem["mask"]]])
    copied = ", ".join(f"{n} copy {kinds.get(g, 'a unique image')}" for g, n in hits.most_common())
    training = json.loads((model_dir / "training.json").read_text())
    return {"name": name, "members": n_m, "duplicated": int(dup.sum()), "heldout": len(held_ids),
            "reference": len(ref), "evaluation": len(ev), "table": table, "windows": windows, "losses": losses,
            "speed": speed, "score_s": score_s, "memorized": mem["count"], "samples": samples, "copied": copied,
            "copied_images": mem["copied_images"], "training": training, "calibration": cal.to_dict(),
            "model": str(model_dir), "dims": int(x[0].numel()),
            "per_image": per_image | {"duplicated": dup.tolist()}}


def throughput(model, x: torch.Tensor, rounds: int = 3) -> dict[str, float]:
    """images/s of the scorer as it was (V alone: --loss-noises 0) and now (V and the loss) in
    this process on the same images: the two alternate for `rounds` rounds (so a machine that
    slows or speeds up meanwhile weighs on both) and each keeps its best round."""
    arms = (("V alone", ScorerSettings(loss_noises=0)), ("V and the loss", ScorerSettings()))
    out = {label: 0.0 for label, _ in arms}
    for _ in range(rounds):
        for label, settings in arms:
            t0 = time.perf_counter()
            for s in range(0, len(x), BATCH):
                score_images(model, x[s:s + BATCH], settings)
                loss_images(model, x[s:s + BATCH], settings)
            out[label] = max(out[label], len(x) / (time.perf_counter() - t0))
    return out


def extra_spearman(model_dir: Path, folders: list[Path]) -> dict:
    """Run-to-run Spearman of every score on a model that is no evidence set (its own images)."""
    model = load_model(model_dir)
    spec = image_spec(model)
    x = torch.cat([images(f, spec)[1] for f in folders])
    runs = [score_all(model, x, ScorerSettings(seed=seed)) for seed in (0, 1)]
    half = np.arange(len(x))[::2]
    cal = [calibrate(take(r, half), "reference") for r in runs]
    return {score: float(spearmanr(judged(runs[0], score, cal[0])[0], judged(runs[1], score, cal[1])[0])[0])
            for score in JUDGED} | {"n": len(x)}


def worst_auc(m: np.ndarray, h: np.ndarray, dup: np.ndarray) -> float:
    """The worse of a score's two AUCs: members vs held-out, duplicated vs unique members."""
    return min(roc_auc(m, h), roc_auc(m[dup], m[~dup]))


def bootstrap_margin(results: list[dict], a: str, b: str, resamples: int = 2000) -> np.ndarray | None:
    """Paired bootstrap of (worst case over the sets of a's worst AUC) - (the same of b's): each
    resample draws every set's duplicated members, unique members and evaluation held-out images
    with replacement (the same draw for both scores, so their correlation is kept), the sets
    independently. None when a result carries no per-image scores (an older --json)."""
    if not all("per_image" in r for r in results):
        return None
    rng = np.random.default_rng(0)
    sets = []
    for r in results:
        p = r["per_image"]
        dup = np.array(p["duplicated"])
        sets.append(({s: (np.array(p[s]["members"]), np.array(p[s]["heldout"])) for s in (a, b)}, dup,
                     np.flatnonzero(dup), np.flatnonzero(~dup), len(p[a]["heldout"])))
    out = np.empty(resamples)
    for i in range(resamples):
        worst = {a: 1.0, b: 1.0}
        for scores, dup, d, u, n_h in sets:
            rows = np.concatenate([rng.choice(d, len(d)), rng.choice(u, len(u))])
            held = rng.integers(0, n_h, n_h)
            for s in (a, b):
                m, h = scores[s]
                worst[s] = min(worst[s], worst_auc(m[rows], h[held], dup[rows]))
        out[i] = worst[a] - worst[b]
    return out


def report(results: list[dict], extras: dict[str, dict], seconds: float) -> str:
    command = " ".join(["benchmarks/scores.py", *(f"--extra {' '.join(sp['args'])}" for sp in extras.values())])
    command = command.replace(str(Path.home()), "~")
    lines = ["## Which score to judge: `benchmarks/scores.py`", "",
             f"Regenerate: `.venv/bin/python {command}` ({seconds:.0f} s; {hardware()}; "
             f"{time.strftime('%Y-%m-%d')}). Scorer: memclean's defaults ({ScorerSettings().solver}-"
             f"{ScorerSettings().steps}, 1 fresh Rademacher probe; the loss at t = {DEFAULT_LOSS_T} over "
             f"{ScorerSettings().loss_noises} noises). AUCs against held-out images and the Spearman with complexity "
             "use the half of the held-out images the calibration never saw.", ""]
    for r in results:
        tr = r["training"]
        lines += [f"### {r['name']}: {r['members']} members ({r['duplicated']} planted copies), {r['heldout']} held-out "
                  f"({r['reference']} as the reference, {r['evaluation']} to evaluate), {r['dims']} dimensions", "",
                  f"Model `{r['model']}`: {training_recipe(tr)}; {r['memorized']} of {r['samples']} generations "
                  f"memorized ({r['copied_images']} distinct pictures copied; a planted group is one picture"
                  + (f": {r['copied']}" if r.get("copied") else "") + ").", "",
                  "| score | AUC members vs held-out | TPR@1%FPR | AUC duplicated vs unique | TPR@1%FPR | worst AUC "
                  "| Spearman with complexity (held-out) | Spearman seed 0 vs 1 | standard error (rms) | sd between seeds "
                  "| flagged members in the plainest quartile |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for score, m in r["table"].items():
            lines.append(f"| {score} | {m['members_vs_heldout']:.3f} | {m['tpr_members']:.3f} | {m['dup_vs_unique']:.3f} "
                         f"| {m['tpr_dup']:.3f} | {m['worst']:.3f} | {m['rho_complexity']:+.2f} | {m['rho_seeds']:.3f} "
                         f"| {m['rms_se']:.3g} | {m['seed_sd']:.3g} | {m['plainest_share']:.0%} of {m['flagged']} |")
        lines += ["", "V over [t, 1] from the same solve, by window start (the grid's times):", "",
                  "| t | AUC members vs held-out | AUC duplicated vs unique | Spearman with complexity |", "|---|---|---|---|",
                  *[f"| {t:.4g} | {a:.3f} | {b:.3f} | {c:+.2f} |" for t, a, b, c in r["windows"]], "",
                  "The denoising score (-log loss) by the loss's time:", "",
                  "| t | AUC members vs held-out | AUC duplicated vs unique | Spearman with complexity |", "|---|---|---|---|",
                  *[f"| {t:g} | {a:.3f} | {b:.3f} | {c:+.2f} |" for t, a, b, c in r["losses"]], "",
                  f"Cost: V is {2 * ScorerSettings().steps} forward and as many backward passes per image, the loss "
                  f"{ScorerSettings().loss_noises} forward passes; images/s on 128 images in one process: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["speed"].items())
                  + f" ({r['speed']['V alone'] / r['speed']['V and the loss']:.2f}x the time).", ""]
    for name, sp in extras.items():
        lines += [f"Run-to-run Spearman on `{name}` ({sp['n']} images, not an evidence set): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sp.items() if k not in ("n", "args")) + ".", ""]
    if results:
        worst = {s: min(r["table"][s]["worst"] for r in results) for s in JUDGED}
        best, default = max(worst, key=worst.get), JudgeSettings().score
        names = " and ".join(r["name"] for r in results)
        baseline = {s: all(r["table"][s][k] >= r["table"]["denoising_score"][k]
                           for r in results for k in ("members_vs_heldout", "dup_vs_unique")) for s in JUDGED}
        lines += [f"The choice: the score with the best worst-case AUC (members vs held-out, and duplicated vs unique) "
                  f"over {names} is `{best}` ({worst[best]:.3f}); `--score` defaults to `{default}` "
                  f"({worst[default]:.3f}). Worst cases: "
                  + ", ".join(f"{s} {v:.3f}" for s, v in sorted(worst.items(), key=lambda kv: -kv[1])) + ". "
                  "At least the 16-noise loss (`denoising_score`) on both AUCs of every set: "
                  + (", ".join(f"`{s}`" for s in JUDGED if baseline[s] and s != "denoising_score") or "none")
                  + ".", ""]
        margin = bootstrap_margin(results, best, default) if best != default else None
        if margin is not None:
            lo, hi = np.quantile(margin, [0.05, 0.95])
            lines += [f"`{best}`'s worst case minus `{default}`'s: {worst[best] - worst[default]:+.3f}, 90% paired "
                      f"bootstrap interval [{lo:+.3f}, {hi:+.3f}] ({len(margin)} resamples of every set's duplicated "
                      f"and unique members and evaluation held-out images); `{best}` is ahead in "
                      f"{np.mean(margin > 0):.0%} of them. "
                      + ("The margin is outside the resampling noise." if lo > 0 else
                         "The margin is within the resampling noise: the measurement does not tell the two apart "
                         "on the worst case."), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    ap.add_argument("--extra", nargs="+", action="append", default=[],
                    help="NAME MODEL FOLDER [FOLDER ...]: run-to-run Spearman only")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/memclean-bench",
                    help="where the second digits set and its model are made once (benchmarks/acceptance.py)")
    ap.add_argument("--wheels", type=Path, default=Path.home() / ".cache/memclean-bench/wheels",
                    help="where scikit-learn's wheel is, when sklearn is not installed (for digits2)")
    ap.add_argument("--samples", type=int, default=500, help="generations counted for memorization")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    ap.add_argument("--from-json", type=Path, default=None, help="the sets' figures from an earlier --json (not rerun)")
    args = ap.parse_args()
    t0 = time.time()
    results = json.loads(args.from_json.read_text())["results"] if args.from_json else []
    for name in args.sets:
        data, model = set_paths(name, args.cache, args.wheels)
        results.append(measure(name, model, data, args.samples))
        shown = {k: v for k, v in results[-1].items() if k not in ("training", "per_image")}
        print(json.dumps(shown, indent=1, default=str), flush=True)
    extras = {e[0]: extra_spearman(Path(e[1]), [Path(f) for f in e[2:]]) | {"args": e} for e in args.extra}
    seconds = time.time() - t0 + (json.loads(args.from_json.read_text()).get("seconds", 0) if args.from_json else 0)
    text = report(results, extras, seconds)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "extras": extras, "seconds": seconds}, indent=1,
                                        default=str))
    write_section("scores", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
