"""The `memclean` command line: one verb per job (DESIGN.md), on top of the library.

Every option of `score`, `clean`, `dedup` and `train` is derived from that verb's settings model
(pipeline/run/settings.py, pipeline/fields.py): its name, type, default, help and validation live
there, once. `demo` runs the flow `clean` with the parameters of prefect.yaml's `clean/demo`;
`report` takes an output folder.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline import __version__
from pipeline.fields import add_options, from_args, options

log = logging.getLogger("memclean.cli")

SECTION_TITLES = {  # RunSettings section -> the help group its options are listed under
    "input": "input", "model": "model", "output": "output", "scorer": "scoring (the probability-flow ODE solve)",
    "cache": "caching and resuming", "flag": "flagging (one policy)", "dedup": "duplicates",
    "remediation": "remediation", "decode": "decoding (no model says how)", "train": "training recipe",
    "guard": "a guard against emptying the dataset", "sample": "sampling (DDIM)",
    "copies": "copies (the ratio test) and what they are held against",
}


def add_sections(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One help group per section of a settings model, with its options."""
    import dataclasses

    for f in dataclasses.fields(cls):
        opts = [o for o in options(cls) if o.path[0] == f.name and o.name not in skip]
        add_options(parser, opts, SECTION_TITLES.get(f.name, f.name))


def progress_bar(total: int, desc: str = "scoring"):
    """A tqdm bar with images/s and the time left."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)


def each_pass(bar, per_pass: int):
    """bar.update for a run that may score its inputs more than once (--precision-target): a
    pass that starts beyond the bar's total adds another pass's worth to it."""
    def update(n: int) -> None:
        if per_pass and bar.n + n > bar.total:
            bar.total += per_pass
            bar.set_description(f"scoring (pass {-(-bar.total // per_pass)})")
        bar.update(n)
    return update


def check_model(settings) -> None:
    """The checkpoint (a folder, or a Hub id in the local cache) found, before any input is
    counted or decoded: a wrong --model fails first, not after the progress bar starts."""
    from pipeline.score.models import resolve_checkpoint

    resolve_checkpoint(settings.model, settings.allow_pickle, settings.variant)


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.io.store import read_metadata
    from pipeline.run.score import count_inputs, score_to_parquet
    from pipeline.run.settings import ScoreSettings

    settings = from_args(ScoreSettings, args)
    check_model(settings.model)
    total = count_inputs(settings.input.data, settings.input.image_column)
    with progress_bar(total) as bar:
        rows, rejected = score_to_parquet(settings, each_pass(bar, total))
    precision = read_metadata(settings.output.out)["precision"]
    ratios = ", ".join("-" if r is None else f"{r:.3g}" for r in precision["noise_ratio_after_each"])
    print(f"scored {rows - rejected} images ({rejected} rejected) in {precision['passes']} pass(es); noise ratio "
          f"of {precision['score']} after each: {ratios} (target {precision['target']}) -> {settings.output.out}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from pipeline.run.lifecycle import run_clean
    from pipeline.run.score import count_inputs
    from pipeline.run.settings import RunSettings

    settings = from_args(RunSettings, args)
    check_model(settings.model)
    total = count_inputs(settings.input.data, settings.input.image_column)
    if settings.flag.reference is not None:
        total += count_inputs(settings.flag.reference, settings.input.image_column)
    with progress_bar(total) as bar:
        result = run_clean(settings, each_pass(bar, total))
    c, sc, t = result["counts"], result["scoring"], result["threshold"]
    out = Path(settings.output.out)
    print(f"scored {sc['scored_fresh']} images afresh, reused {sc['reused']} cached scores, in "
          f"{sc['precision']['passes']} pass(es) (noise ratio after each: {sc['precision']['noise_ratio_after_each']})")
    print(f"{c['input']} inputs: {c['kept']} kept, {c['augmented']} augmented, {c['dropped']} dropped, "
          f"{c['rejected']} rejected ({c['flagged']} flagged at {t['value']:.6g}, {t['policy']}) -> {out}")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from pipeline.run.dedup import run_dedup
    from pipeline.run.score import count_inputs
    from pipeline.run.settings import DedupRunSettings

    settings = from_args(DedupRunSettings, args)
    with progress_bar(count_inputs(settings.input.data, settings.input.image_column), "embedding") as bar:
        result = run_dedup(settings, bar.update)
    c, d = result["counts"], result["dedup"]
    out = Path(settings.output.out)
    print(f"{c['input']} inputs: {c['kept']} kept, {c['dropped']} dropped as duplicates, {c['rejected']} rejected "
          f"({d['clusters']} clusters of {d['in_clusters']} images at {d['threshold']:.6g}, {d['embedder']}) -> {out}")
    print(f"report: {out / 'report.html'}")
    return 0


def flags_line(f: dict) -> str:
    """verify's line on the clean run's flags held against the copied images (its manifest's
    `flags`): with no copied image there is no recall and no AUC to give, and it says so."""
    others = "-" if f["flag_rate_not_copied"] is None else f"{f['flag_rate_not_copied']:.1%}"
    if f["recall"] is None:
        return ("no training image is copied, so the clean run's flags cannot be held against copies "
                f"(it flagged {others} of the images)")
    auc = ", ".join(f"{k} {v:.3f}" for k, v in f["auc"].items()) or "- (no image both scored and not copied)"
    return (f"the clean run flagged {f['recall']:.1%} of the copied images (flag rate among the others: "
            f"{others}); AUC copied vs not: {auc}")


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.run.score import count_inputs
    from pipeline.run.settings import VerifySettings
    from pipeline.run.verify import run_verify, training_set

    settings = from_args(VerifySettings, args)
    check_model(settings.model)
    data, _, _ = training_set(settings.input.data, settings.copies.clean_output)  # a clean output: its data
    total = count_inputs(data, settings.input.image_column) + settings.sample.generations
    with progress_bar(total, "decoding, sampling") as bar:
        m = run_verify(settings, bar.update)
    c, s, out = m["copies"], m["similar"], Path(settings.output.out)
    print(f"{m['generations']} generations: {c['generations']} copy a training picture ({c['rate']:.1%}, 95% interval "
          f"{c['interval95'][0]:.1%}-{c['interval95'][1]:.1%}); {c['copied_pictures']} pictures copied "
          f"({c['copied_images']} training images); {s['generations']} similar at {s['threshold']['value']:.4g}")
    held = c["held_out"]
    if held:
        print(f"held-out images that pass the same test (its false-copy rate here): {held['passing']} of {held['images']}")
    if m["flags"]:
        print(flags_line(m["flags"]))
    print(f"-> {out}\nreport: {out / 'report.html'}")
    return 0


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def demo_parameters(root: Path) -> dict[str, Any]:
    """The parameters of prefect.yaml's clean/demo deployment (its one source), with the
    bundled demo's paths made absolute."""
    import yaml

    with open(root / "prefect.yaml") as f:
        config = yaml.safe_load(f)
    (demo,) = [d for d in config["deployments"] if d["name"] == "demo"]
    params = dict(demo["parameters"])
    for k in ("data", "reference", "model"):
        params[k] = str(root / params[k])
    return params


def cmd_demo(args: argparse.Namespace) -> int:
    """The clean flow on the bundled demo, in Prefect's ephemeral mode (no server needed)."""
    root = repo_root()
    if not (root / "prefect.yaml").is_file():
        raise SystemExit("memclean: the bundled demo is not here; run from a clone of the repository")
    params = demo_parameters(root)
    missing = [params[k] for k in ("data", "reference", "model") if not Path(params[k]).exists()]
    if missing:
        raise SystemExit(f"memclean: the bundled demo is not here ({', '.join(missing)}); run from a clone of the repository")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the ephemeral server phones nowhere
    from flows.clean import clean

    out = args.out.resolve()
    manifest = clean(**{**params, "out": str(out), "overwrite": True})
    c = manifest["counts"]
    print(f"{c['input']} inputs: {c['kept']} kept, {c['augmented']} augmented, {c['dropped']} dropped, "
          f"{c['rejected']} rejected ({c['flagged']} flagged)")
    print(f"outputs: {out}")
    report = out / "report.html"
    if report.exists():
        print(f"report:  {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.io.report import fill_missing_thumbnails, write_report

    if not (args.dir / "manifest.json").is_file():
        raise SystemExit(f"memclean: {args.dir} is not a memclean clean output (no manifest.json)")
    made = fill_missing_thumbnails(args.dir)
    if made:
        print(f"made {made} missing thumbnails from the source images")
    print(f"report: {write_report(args.dir)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.io.data import ImageSpec, discover
    from pipeline.run.settings import TrainRunSettings
    from pipeline.tools.train import load_images, train

    settings = from_args(TrainRunSettings, args)
    out, recipe = Path(settings.output.out), settings.train
    if out.exists() and not settings.output.overwrite:
        raise SystemExit(f"memclean: {out} exists; pass --overwrite to replace it")
    spec = ImageSpec(recipe.channels, (recipe.sample_size,) * 2, settings.input.max_pixels, settings.input.min_size)
    images = load_images(discover(settings.input.data, settings.input.image_column), spec)
    with tqdm(total=recipe.steps, desc="training", unit="step", file=sys.stderr) as bar:
        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        train(images, out, recipe, progress, recipe={"command": "memclean " + " ".join(sys.argv[1:])})
    print(f"trained on {len(images)} images -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipeline.run.settings import DedupRunSettings, RunSettings, ScoreSettings, TrainRunSettings, VerifySettings

    parser = argparse.ArgumentParser(prog="memclean", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"memclean {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score images by log volume growth, nothing else (--out FILE.parquet)")
    add_sections(p, ScoreSettings)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("clean", help="the whole pipeline: score, flag, dedup, remediate, write a cleaned "
                                     "dataset (--out DIR)")
    add_sections(p, RunSettings)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("dedup", help="the duplicate search alone, no model or scores: clusters, --against and a "
                                     "deduplicated dataset (--out DIR)")
    add_sections(p, DedupRunSettings)
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser("verify", help="sample the model, find the training images its generations copy, and hold a "
                                      "clean run's flags against them (--out DIR)")
    add_sections(p, VerifySettings)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="the clean flow on the bundled demo (Prefect, ephemeral; ~1 min on 2 cores)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="(re)write DIR/report.html from a clean or dedup output")
    p.add_argument("dir", type=Path, help="a memclean clean or dedup output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train", help="train a small DDPM (demo and proxy models; --out MODEL_DIR)")
    add_sections(p, TrainRunSettings)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: models are local
    try:
        return args.func(args)
    except (ValueError, FileExistsError) as e:  # bad settings, checkpoints, outputs: no traceback
        print(f"memclean: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, an unwritable folder: the run left nothing half-written
        print(f"memclean: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
