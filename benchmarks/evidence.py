"""Evidence that the score finds memorized images, on the bundled demo or the photo set; writes RESULTS.md.

    .venv/bin/python benchmarks/evidence.py [--set demo|photos] [--samples 1000] [--retrain-steps N]
                                            [--retrain-seeds 0 1 2]

--set demo (the default): examples/digits with examples/model, `memclean demo`'s settings;
--set photos: examples/photos with examples/photo-model, the same settings otherwise. Each
writes its own section (evidence, evidence-photos).

1. cleans the demo's training set with `memclean demo`'s settings (held-out split as the
   reference), which scores members (train/) and held-out images (heldout/);
3. (run before 2, which uses it) generates samples and counts memorized ones (nearest
   training image closer than 1/3 of the second-nearest distinct one, L2), and checks that
   the images they copy are the ones memclean flags;
2. separation of members vs held-out, duplicated vs unique members, unique members vs
   held-out and copied vs not copied members, for log_volume_growth and logp, next to two
   baselines: the denoising loss at a fixed step (loss-based membership inference) and the
   distance to the nearest other training image; and the scores by number of copies;
4. retrains with the recipe in the model's training.json on the cleaned set (once per
   --retrain-seeds, to show what another seed alone changes), and counts memorized samples
   again, next to the shipped model (the same recipe on the original set). A continued model's
   runs are replayed in turn (each continuing the one before, as training.json records them).
   The photo set is not retrained unless --retrain-seeds is given: its recipe is 4,000 + 3,500
   steps, about two hours on 2 cores.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results import write_section  # noqa: E402
from memclean.cli import demo_parameters  # noqa: E402
from pipeline.decide.flagging import SCORE_CHOICES  # noqa: E402
from pipeline.decide.scores import JudgeSettings  # noqa: E402
from pipeline.io.data import ImageSpec, decode_item, discover  # noqa: E402
from pipeline.run.lifecycle import run_clean  # noqa: E402
from pipeline.run.settings import RunSettings  # noqa: E402
from pipeline.tools.evaluate import denoising_loss, generate, memorized, nearest, roc_auc, separation  # noqa: E402
from pipeline.tools.train import TrainSettings, load_images, train  # noqa: E402


def load_pipeline(path: Path):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True)
    return pipe.unet.eval(), pipe.scheduler


def flat(source: str, spec: ImageSpec) -> tuple[list[str], torch.Tensor]:
    ds = [decode_item(i, spec) for i in discover(source)]
    return [d.item.id for d in ds], torch.stack([d.pixels for d in ds])


def shown(path: Path) -> str:
    """A path as the README writes it: relative to the repository when it is inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def runs_of(training: dict) -> list[dict]:
    """A model's training runs, first to last, from its training.json: `memclean train --init-from`
    keeps the record of the model it continued under init_from (which may itself continue one)."""
    earlier = training.get("init_from")
    return (runs_of(earlier) if isinstance(earlier, dict) else []) + [training]


def training_recipe(training: dict) -> str:
    """How a model was trained, as RESULTS.md says it: each run's command, a continued model's in order."""
    runs = runs_of(training)
    text = ", then ".join(f"`{r.get('command', '')}`" for r in runs)
    return text if len(runs) == 1 else f"{text} ({training.get('total_steps')} steps in all)"


def retrain(images: torch.Tensor, out: Path, runs: list[dict], seed: int, last_steps: int | None = None) -> Path:
    """A model's recipe replayed on other images: its runs in turn, each later one continuing the one
    before (init_from), as they were trained. `seed` replaces the first run's seed (a continuing run
    keeps its own); `last_steps`, when given, the last run's steps."""
    model = None
    for i, run in enumerate(runs):
        ts = {**run["settings"], "block_out_channels": tuple(run["settings"]["block_out_channels"]),
              "init_from": None if model is None else str(model)}
        if i == 0:
            ts["seed"] = seed
        if i == len(runs) - 1 and last_steps:
            ts["steps"] = last_steps
        model = train(images, out / f"run-{i}", TrainSettings(**ts))
    return model


def planted(data: Path) -> dict[str, dict]:
    """{training id: {group, kind, copies}} from the demo's planted.csv."""
    with open(data.parent / "planted.csv", newline="") as f:
        return {r["file"].split("/", 1)[1]: {"group": int(r["group"]), "kind": r["kind"], "copies": int(r["copies"])}
                for r in csv.DictReader(f)}


def planted_groups(train: Path, ids: list[str]) -> np.ndarray:
    """Each training id's picture for `memorized`: its planted group for a planted copy (exact
    or near copies of one picture are one picture, so a copy beside it excuses no generation),
    else the id itself."""
    plant = planted(train)
    return np.array([f"g{plant[i]['group']}" if i in plant else i for i in ids])


def row(cells: list) -> str:
    return "| " + " | ".join(cells) + " |"


def sep_row(cmp: str, score: str, s: dict) -> str:
    return row([cmp, score, f"{s['mean_pos']:.4g}", f"{s['mean_neg']:.4g}", f"{s['welch_p']:.2e}",
                f"{s['auc']:.3f}", f"{s['tpr_at_1pct_fpr']:.3f}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=("demo", "photos"), default="demo")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--retrain-steps", type=int, default=None, help="the last training run's steps (default: the recipe's)")
    ap.add_argument("--retrain-seeds", type=int, nargs="*", default=None,
                    help="seeds of the retraining on the cleaned set (default: the shipped recipe's for the demo, "
                         "none for photos); none given: no retraining")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    demo = demo_parameters(REPO)  # prefect.yaml's clean/demo: what memclean demo runs
    if args.set == "photos":
        demo = {**demo, "model": str(REPO / "examples" / "photo-model"), "data": str(REPO / "examples" / "photos" / "train"),
                "reference": str(REPO / "examples" / "photos" / "heldout")}
    what = {"demo": ("digits", "Demo"), "photos": ("pictures", "Photo set")}[args.set]
    model_dir, data = Path(demo["model"]), Path(demo["data"])
    unet, scheduler = load_pipeline(model_dir)
    spec = ImageSpec(unet.config.in_channels, (unet.config.sample_size,) * 2)
    work = Path(tempfile.mkdtemp(prefix="memclean-evidence-"))

    # 1: a demo clean run scores members and held-out images
    settings = RunSettings.from_flat({**demo, "out": str(work / "clean")})
    scorer = settings.scorer
    manifest = run_clean(settings)
    import pyarrow.parquet as pq

    by_id = {r["id"]: r for r in pq.read_table(work / "clean" / "scores.parquet").to_pylist()}
    held = pq.read_table(work / "clean" / "reference_scores.parquet").to_pylist()
    member_ids, x_train = flat(str(data), spec)
    _, x_held = flat(demo["reference"], spec)
    plant = planted(data)
    copies = np.array([plant[i]["copies"] if i in plant else 1 for i in member_ids])
    kind = np.array([plant[i]["kind"] if i in plant else "unique" for i in member_ids])
    group = planted_groups(Path(data), member_ids)
    dup = copies > 1

    # 3 (first: step 2 compares against what the generations copy): memorized generations of
    # the shipped model; copies of one image count as one image
    tr = x_train.flatten(1).numpy()
    samples = generate(unet, dict(scheduler.config), args.samples, seed=0).flatten(1).numpy()
    mem = memorized(samples, tr, groups=group)
    flagged = np.array([bool(by_id[i]["flagged"]) for i in member_ids])
    action = np.array([by_id[i]["action"] for i in member_ids])
    copied = np.zeros(len(member_ids), bool)
    copied[mem["copied_train_rows"]] = True
    hits_per_row = np.zeros(len(member_ids), int)
    np.add.at(hits_per_row, mem["nearest"][mem["mask"]], 1)
    removed = np.isin(action, ["dropped", "augmented"])
    can_copy = copied.any() and (~copied).any()

    # 2: separation
    lines, auc = [], {}
    scores = {s: np.array([by_id[i][s] for i in member_ids]) for s in SCORE_CHOICES}
    for name, m in scores.items():
        h = np.array([r[name] for r in held])
        lines.append(("members vs held-out", name, separation(m, h)))
        lines.append(("duplicated vs unique members", name, separation(m[dup], m[~dup])))
        lines.append(("unique members vs held-out", name, separation(m[~dup], h)))
        if can_copy:
            lines.append(("copied vs not copied members", name, separation(m[copied], m[~copied])))
        auc[name] = (lines[-1] if can_copy else lines[-3])[2]["auc"]  # copied vs not, else members vs held-out
    loss_m = -denoising_loss(unet, scheduler, x_train)
    loss_h = -denoising_loss(unet, scheduler, x_held)
    lines.append(("members vs held-out", "-denoising loss (k=100)", separation(loss_m, loss_h)))
    lines.append(("duplicated vs unique members", "-denoising loss (k=100)", separation(loss_m[dup], loss_m[~dup])))
    lines.append(("unique members vs held-out", "-denoising loss (k=100)", separation(loss_m[~dup], loss_h)))
    if can_copy:
        lines.append(("copied vs not copied members", "-denoising loss (k=100)",
                      separation(loss_m[copied], loss_m[~copied])))
    nn_m = -nearest(tr, tr, exclude_self=True)[0]
    nn_h = -nearest(x_held.flatten(1).numpy(), tr)[0]
    lines.append(("members vs held-out", "-NN distance to other training images", separation(nn_m, nn_h)))
    lines.append(("duplicated vs unique members", "-NN distance to other training images",
                  separation(nn_m[dup], nn_m[~dup])))
    if can_copy:
        lines.append(("copied vs not copied members", "-NN distance to other training images",
                      separation(nn_m[copied], nn_m[~copied])))

    # 4: retrain on the cleaned set with the same recipe, count memorized generations again
    recipe = json.loads((model_dir / "training.json").read_text())
    runs = runs_of(recipe)
    retrain_steps = sum(r["settings"]["steps"] for r in runs[:-1]) + (args.retrain_steps or runs[-1]["settings"]["steps"])
    cleaned = load_images(discover(str(work / "clean" / "cleaned")), spec)
    retrains = []  # (seed, seconds, memorized)
    shipped_seeds = ", then ".join(f"seed {r['settings']['seed']}" for r in runs)
    first_seed = runs[0]["settings"]["seed"]
    seeds = args.retrain_seeds if args.retrain_seeds is not None else ([first_seed] if args.set == "demo" else [])
    for seed in seeds:
        t1 = time.time()
        retrained = retrain(cleaned, work / f"retrained-{seed}", runs, seed, args.retrain_steps)
        retrain_s = time.time() - t1
        unet2, sched2 = load_pipeline(retrained)
        retrains.append((seed, retrain_s, memorized(generate(unet2, dict(sched2.config), args.samples, seed=0)
                                                    .flatten(1).numpy(), tr, groups=group)))
        print(f"retrained with seed {seed} in {retrain_s:.0f} s: {retrains[-1][2]['count']} memorized", flush=True)

    best = max(auc, key=auc.get)
    default = JudgeSettings().score
    c = manifest["counts"]
    t = manifest["threshold"]
    out = [
        "## Evidence on the bundled demo: `benchmarks/evidence.py`" if args.set == "demo" else
        "## Evidence on the photo set: `benchmarks/evidence.py --set photos`",
        "",
        f"Regenerate: `.venv/bin/python benchmarks/evidence.py{'' if args.set == 'demo' else ' --set photos'}` "
        f"({time.time() - t0:.0f} s on "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}).",
        "",
        f"{what[1]}: {len(member_ids)} training images, {int((~dup).sum())} of them unique and {int(dup.sum())} planted "
        f"copies ({len(set(group[dup]))} {what[0]}, exact or near copies, {', '.join(map(str, sorted(set(copies[dup]))))} "
        f"copies each: `{shown(Path(data).parent / 'planted.csv')}`), {len(held)} held-out images. "
        f"Model: the shipped `{shown(model_dir)}`, "
        f"trained with {training_recipe(recipe)}. Scores: {scorer.solver} with {scorer.steps} steps, "
        f"{scorer.divergence} divergence, {scorer.probes} {scorer.probe_mode} probe per evaluation, the loss over "
        f"{scorer.loss_noises} noises, as `memclean demo`.",
        "",
        "### Separation (higher = member, or duplicated)",
        "",
        "| comparison | score | mean (pos) | mean (neg) | Welch p (one-sided) | ROC AUC | TPR at 1% FPR |",
        "|---|---|---|---|---|---|---|",
        *[sep_row(a, b, s) for a, b, s in lines],
        "",
        f"Which score flagging judges: the one that better separates the training images the model's "
        f"generations copy from the rest ({'copied vs not copied' if can_copy else 'members vs held-out'}, "
        f"the memorization memclean exists to find): {best}, AUC {auc[best]:.3f} against "
        f"{min(auc.values()):.3f}. `--score` defaults to `{default}`"
        + ("." if best == default else f"; this run favours `{best}`.")
        + " The calibrated scores are fitted on these same held-out images (the run's reference), so their "
        "members-vs-held-out rows are in sample here; `benchmarks/scores.py` measures them out of sample and "
        "chose the default there.",
        "",
        "### By number of copies in the training set",
        "",
        f"Threshold {t['value']:.5g} (reference FPR {t['parameters'].get('fpr')}); a copied image is a distinct "
        "training image that at least one generation copies.",
        "",
        f"| copies | kind | images | mean log_volume_growth | mean logp | mean {default} (judged) | flagged | "
        "dropped or augmented | generations copying |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(set(copies)):
        for kd in sorted(set(kind[copies == k])):
            sel = (copies == k) & (kind == kd)
            out.append(row([str(k), kd, str(int(sel.sum())), f"{scores['log_volume_growth'][sel].mean():.4g}",
                            f"{scores['logp'][sel].mean():.4g}", f"{scores[default][sel].mean():.4g}",
                            f"{flagged[sel].mean():.0%}",
                            f"{removed[sel].mean():.0%}", str(int(hits_per_row[sel].sum()))]))
    copied_line = (
        f"Of the {int(copied.sum())} training images whose {what[0][:-1]} the shipped model's generations copy, "
        f"{flagged[copied].mean():.0%} are flagged by memclean and {removed[copied].mean():.0%} are dropped or "
        f"augmented, against a flag rate of {flagged.mean():.0%} over all training images. AUC, copied vs not "
        f"copied training images: {default} (judged) "
        f"{roc_auc(scores[default][copied], scores[default][~copied]):.3f}, log_volume_growth "
        f"{roc_auc(scores['log_volume_growth'][copied], scores['log_volume_growth'][~copied]):.3f}."
        if copied.any() and (~copied).any() else "No generation of the shipped model copies a training image.")
    out += [
        "",
        "### Memorized generations",
        "",
        f"A generation is memorized when its nearest training image (L2) is closer than 1/3 of the nearest "
        f"*distinct* one (copies of one {what[0][:-1]} count as one image). {args.samples} DDIM samples (50 steps, "
        "seed 0) from each model." + ("" if retrains else " Not retrained on the cleaned output (`--retrain-seeds`)."),
        "",
        f"| model | memorized generations | distinct {what[0]} copied |",
        "|---|---|---|",
        f"| shipped: the recipe on the original {len(member_ids)} images ({shipped_seeds}) | {mem['count']} | "
        f"{mem['copied_images']} |",
        *[f"| the same recipe ({retrain_steps} steps, {s:.0f} s) on memclean's cleaned output ({len(cleaned)} images), "
          f"seed {seed} | {m2['count']} | {m2['copied_images']} |" for seed, s, m2 in retrains],
        "",
        copied_line,
        "",
        f"The clean run: {c['input']} inputs, {c['kept']} kept, {c['augmented']} augmented, {c['dropped']} "
        f"dropped ({manifest['dedup']['clusters']} duplicate clusters), {c['flagged']} flagged.",
        "",
    ]
    write_section("evidence" if args.set == "demo" else "evidence-photos", "\n".join(out), args.out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
