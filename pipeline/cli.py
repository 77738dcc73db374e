"""The `memclean` command line: one verb per job (DESIGN.md)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .data import ImageSpec
from .models import DATA_RANGES
from .volume import DIVERGENCES, GRIDS, PRECISIONS, PROBE_MODES, SOLVERS, ScorerSettings

log = logging.getLogger("pipeline.cli")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="local diffusers checkpoint folder (flat layout or save_pretrained pipeline)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin) weights; they can run code when loaded")
    p.add_argument("--variant", default=None,
                   help="diffusers weight variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    p.add_argument("--data-range", choices=("auto", *DATA_RANGES), default="auto",
                   help="the range the model was trained on: auto (VP/DDPM models [-1, 1], VE/NCSN++ [0, 1]), "
                        "signed [-1, 1] or unit [0, 1]; V, log p and bits/dim are for the image in it")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs")
    p.add_argument("--batch-size", type=int, default=16, help="images decoded and solved together")


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    d = ScorerSettings()
    g = p.add_argument_group("scoring (the probability-flow ODE solve)")
    g.add_argument("--divergence", choices=DIVERGENCES, default=d.divergence,
                   help="div f: exact (D backward passes, tiny images) or Hutchinson probes "
                        f"(default {d.divergence})")
    g.add_argument("--probes", type=int, default=d.probes,
                   help=f"Hutchinson probes per drift evaluation (default {d.probes})")
    g.add_argument("--probe-mode", "--probes-per-step", choices=PROBE_MODES, default=None,
                   help="fresh: new probes at every drift evaluation (fixed grids; the noise averages "
                        "over the evaluations); fixed: one set for the whole solve (default: fresh for "
                        "euler/heun/rk4; dopri5 always uses fixed, its step control needs a "
                        "deterministic right-hand side)")
    g.add_argument("--solver", choices=SOLVERS, default=d.solver,
                   help=f"heun, euler, rk4: a fixed grid of --steps; dopri5: adaptive (--rtol/--atol, "
                        f"fixed probes, one image at a time, about 40x slower) (default {d.solver})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"fixed-grid steps (default {d.steps})")
    g.add_argument("--grid", choices=GRIDS, default=d.grid,
                   help="fixed-grid times: uniform in log-SNR (accurate on sharply peaked image data) "
                        f"or uniform in t (default {d.grid})")
    g.add_argument("--rtol", type=float, default=d.rtol, help=f"dopri5 relative tolerance (default {d.rtol})")
    g.add_argument("--atol", type=float, default=d.atol, help=f"dopri5 absolute tolerance (default {d.atol})")
    g.add_argument("--eps", type=float, default=d.eps, help=f"start time of the solve (default {d.eps})")
    g.add_argument("--seed", type=int, default=d.seed,
                   help=f"probe seed, hashed with each image's content (default {d.seed})")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="the network's arithmetic: fp32, tf32 (CUDA matmuls and convolutions) or bf16 "
                        f"(autocast); V is float64 whatever it is (default {d.precision})")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--data", required=True, type=Path,
                   help="a folder of images (recursive), a Parquet file or folder with an image "
                        "column, or a text file listing image paths")
    g.add_argument("--image-column", default=None,
                   help="Parquet: the column holding images (default: 'image', or the only binary one)")
    g.add_argument("--max-pixels", type=int, default=ImageSpec.max_pixels,
                   help=f"reject larger images as decompression bombs (default {ImageSpec.max_pixels})")
    g.add_argument("--min-size", type=int, default=ImageSpec.min_size,
                   help=f"reject images whose shorter side is smaller (default {ImageSpec.min_size} px)")


def settings_from_args(args: argparse.Namespace) -> ScorerSettings:
    return ScorerSettings(divergence=args.divergence, probes=args.probes, probe_mode=args.probe_mode,
                          solver=args.solver, steps=args.steps, rtol=args.rtol, atol=args.atol,
                          eps=args.eps, seed=args.seed, grid=args.grid, precision=args.precision)


def check_common(args: argparse.Namespace) -> None:
    """Validate what argparse cannot, before any work starts."""
    if args.batch_size < 1:
        raise SystemExit(f"memclean: --batch-size must be at least 1, got {args.batch_size}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("memclean: --device cuda was asked for, but torch sees no CUDA device")


def cmd_score(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import discover
    from .models import load_model
    from .scoring import image_spec, score_items
    from .store import SCORE_SCHEMA, AtomicParquetWriter
    from .volume import bits_offset

    settings = settings_from_args(args)
    check_common(args)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"memclean: {args.out} exists; pass --overwrite to replace it")
    source = discover(args.data, args.image_column)
    model = load_model(args.model, args.allow_pickle, args.device, args.variant, args.data_range)
    spec = image_spec(model, args.max_pixels, args.min_size)
    metadata = {"settings": settings.to_dict(), "model": {"path": str(args.model),
                "fingerprint": model.fingerprint, "scheduler": model.scheduler_class,
                "layout": model.checkpoint.layout, "variant": args.variant,
                "data_range": list(model.data_range), "bits_per_dim_offset": bits_offset(model.data_range)},
                "data": str(args.data), "batch_size": args.batch_size, "device": args.device,
                "memclean_version": __version__}
    rejected = 0
    with AtomicParquetWriter(args.out, SCORE_SCHEMA, metadata) as writer, \
            tqdm(total=source.count(), desc="scoring", unit="img", file=sys.stderr) as bar:
        for rows in score_items(model, source, settings, spec, args.batch_size, args.device, bar.update):
            writer.write(rows)
            rejected += sum(r["status"] == "rejected" for r in rows)
    print(f"scored {writer.count - rejected} images ({rejected} rejected) -> {args.out}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .clean import CleanSettings, run_clean
    from .data import discover
    from .flagging import FlagSettings
    from .remediate import RemediationSettings

    scorer = settings_from_args(args)
    check_common(args)
    settings = CleanSettings(
        flag=FlagSettings(quantile=args.flag_quantile, fpr=args.flag_fpr, zscore=args.flag_zscore,
                          threshold=args.flag_threshold),
        remediation=RemediationSettings(action=args.action, tries=args.augment_tries,
                                        on_failure=args.on_failure, seed=args.augment_seed,
                                        accept_band=args.accept_band),
        score=args.score, reference=None if args.reference is None else str(args.reference),
        embedder=args.embedder, embed_size=args.embed_size, dup_threshold=args.dup_threshold,
        dedup_flip=args.dedup_flip, against=None if args.against is None else str(args.against),
        batch_size=args.batch_size, device=args.device, variant=args.variant, data_range=args.data_range,
        image_column=args.image_column,
        max_pixels=args.max_pixels, min_size=args.min_size, shard_size=args.shard_size)
    total = discover(args.data, args.image_column).count()
    if args.reference is not None:
        total += discover(args.reference, args.image_column).count()
    with tqdm(total=total, desc="scoring", unit="img", file=sys.stderr) as bar:
        result = run_clean(args.data, args.model, args.out, scorer, settings, args.allow_pickle,
                           args.overwrite, bar.update, None if args.no_cache else args.cache_dir)
    c = result["counts"]
    sc = result["scoring"]
    print(f"scored {sc['scored_fresh']} images afresh, reused {sc['reused']} cached scores")
    print(f"{c['input']} inputs: {c['kept']} kept, {c['augmented']} augmented, {c['dropped']} dropped, "
          f"{c['rejected']} rejected ({c['flagged']} flagged at {result['threshold']['value']:.6g}, "
          f"{result['threshold']['policy']}) -> {args.out}")
    print(f"report: {args.out / 'report.html'}")
    return 0


def add_decision_args(p: argparse.ArgumentParser) -> None:
    from .cache import default_cache_dir
    from .clean import SCORE_CHOICES, CleanSettings
    from .flagging import DEFAULT_QUANTILE
    from .remediate import ACTION_MODES, ON_FAILURE

    c = CleanSettings()
    g = p.add_argument_group("flagging (one policy)")
    g.add_argument("--reference", type=Path, default=None,
                   help="held-out images the model never saw: flag above their (1 - A) quantile")
    g.add_argument("--flag-fpr", type=float, default=None,
                   help="A, the share of unmemorized images flagged, with --reference (default 0.05)")
    g.add_argument("--flag-quantile", type=float, default=None,
                   help=f"flag above this quantile of the dataset's own scores (the policy when none is named, "
                        f"at {DEFAULT_QUANTILE})")
    g.add_argument("--flag-zscore", type=float, default=None,
                   help="flag above median + Z * 1.4826 MAD of the dataset's scores")
    g.add_argument("--flag-threshold", type=float, default=None,
                   help="flag above this absolute score (e.g. an earlier run's manifest threshold)")
    g.add_argument("--score", choices=SCORE_CHOICES, default=c.score,
                   help=f"the score that flagging judges (default {c.score})")
    g = p.add_argument_group("duplicates")
    g.add_argument("--embedder", default=c.embedder,
                   help="pixel (model-free, default), unet (the model's own features) or "
                        "torchscript:PATH (a local TorchScript model, e.g. SSCD)")
    g.add_argument("--embed-size", type=int, default=c.embed_size, help="torchscript input side (default 224)")
    g.add_argument("--dup-threshold", type=float, default=None,
                   help="cosine similarity at or above which two images are duplicates (pixel: the "
                        "correlation of 32x32 blurred grey thumbnails maximised over 1-pixel shifts, "
                        "default 0.95; unet 0.95; torchscript 0.75)")
    g.add_argument("--dedup-flip", action="store_true", help="also match horizontally mirrored copies")
    g.add_argument("--against", type=Path, default=None,
                   help="an earlier memclean output: new images that duplicate its kept images are dropped")
    g = p.add_argument_group("remediation")
    g.add_argument("--action", choices=ACTION_MODES, default=c.remediation.action,
                   help="auto: dedup, then augment flagged survivors; dedup; augment; drop flagged; "
                        f"none (default {c.remediation.action})")
    g.add_argument("--augment-tries", type=int, default=c.remediation.tries,
                   help="augmentations per image, each with a new seed; the preset rises (light -> medium -> "
                        "strong) after a variant above the threshold and falls after one below the band "
                        f"(default {c.remediation.tries}, at most 20)")
    g.add_argument("--on-failure", choices=ON_FAILURE, default=c.remediation.on_failure,
                   help="what happens to an image no augmentation brought below the threshold")
    g.add_argument("--augment-seed", type=int, default=c.remediation.seed, help="augmentation seed")
    g.add_argument("--accept-band", type=float, default=c.remediation.accept_band,
                   help="a variant is accepted only at or above this quantile of ordinary images' scores (the "
                        "reference's, else the dataset's) and not above the threshold: replacements must stay "
                        f"in distribution; 0 for no floor (default {c.remediation.accept_band})")
    g = p.add_argument_group("caching and resuming")
    g.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="score cache, by image content + model fingerprint + scorer settings "
                        "(default $MEMCLEAN_CACHE or ~/.cache/memclean)")
    g.add_argument("--no-cache", action="store_true", help="score everything afresh, cache nothing")
    g.add_argument("--shard-size", type=int, default=c.shard_size,
                   help=f"images per scoring shard: the unit of caching and resuming (default {c.shard_size})")


DEMO = {  # the bundled demo: digits with planted duplicates, a held-out split, a small DDPM
    "data": "examples/digits/train", "reference": "examples/digits/heldout", "model": "examples/model",
    "batch_size": 100, "dup_threshold": 0.985,
}


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def cmd_demo(args: argparse.Namespace) -> int:
    """The clean flow on the bundled demo, in Prefect's ephemeral mode (no server needed)."""
    root = repo_root()
    params = {k: str(root / v) if k in ("data", "reference", "model") else v for k, v in DEMO.items()}
    missing = [params[k] for k in ("data", "reference", "model") if not Path(params[k]).exists()]
    if missing:
        raise SystemExit(f"memclean: the bundled demo is not here ({', '.join(missing)}); run from a clone of the repository")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the ephemeral server phones nowhere
    from flows.clean import clean

    out = args.out.resolve()
    manifest = clean(out=str(out), overwrite=True, **params)
    c = manifest["counts"]
    print(f"{c['input']} inputs: {c['kept']} kept, {c['augmented']} augmented, {c['dropped']} dropped, "
          f"{c['rejected']} rejected ({c['flagged']} flagged)")
    print(f"outputs: {out}")
    report = out / "report.html"
    if report.exists():
        print(f"report:  {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import fill_missing_thumbnails, write_report

    if not (args.dir / "manifest.json").is_file():
        raise SystemExit(f"memclean: {args.dir} is not a memclean clean output (no manifest.json)")
    made = fill_missing_thumbnails(args.dir)
    if made:
        print(f"made {made} missing thumbnails from the source images")
    print(f"report: {write_report(args.dir)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import ImageSpec, discover
    from .train import TrainSettings, load_images, train

    settings = TrainSettings(sample_size=args.sample_size, channels=args.channels,
                             block_out_channels=tuple(args.block_out_channels), steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             beta_schedule=args.beta_schedule)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"memclean: {args.out} exists; pass --overwrite to replace it")
    images = load_images(discover(args.data), ImageSpec(settings.channels, (settings.sample_size,) * 2))
    with tqdm(total=settings.steps, desc="training", unit="step", file=sys.stderr) as bar:
        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        train(images, args.out, settings, progress, recipe={"command": "memclean " + " ".join(sys.argv[1:])})
    print(f"trained on {len(images)} images -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memclean", description=__doc__)
    parser.add_argument("--version", action="version", version=f"memclean {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score images by log volume growth, nothing else")
    add_data_args(p)
    p.add_argument("--out", required=True, type=Path, help="output .parquet file, one row per image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_model_args(p)
    add_scoring_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("clean", help="the whole pipeline: score, flag, dedup, remediate, write a cleaned dataset")
    add_data_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (see README: Outputs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_decision_args(p)
    add_model_args(p)
    add_scoring_args(p)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("report", help="(re)write DIR/report.html from a clean run's outputs")
    p.add_argument("dir", type=Path, help="the output folder of memclean clean / demo")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the clean flow on the bundled demo (Prefect, ephemeral: no server)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder, replaced if present (demo-out)")
    p.set_defaults(func=cmd_demo)

    from .train import BETA_SCHEDULES, TrainSettings

    t = TrainSettings()
    p = sub.add_parser("train", help="train a small DDPM (demo and proxy models)")
    p.add_argument("--data", required=True, type=Path, help="folder of training images (recursive)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder (save_pretrained layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--sample-size", type=int, default=t.sample_size, help="square image size")
    p.add_argument("--channels", type=int, default=t.channels, choices=(1, 3), help="image channels")
    p.add_argument("--block-out-channels", type=int, nargs="+", default=list(t.block_out_channels),
                   help="UNet width per resolution level")
    p.add_argument("--steps", type=int, default=t.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=t.lr, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=t.seed, help="seed for initialisation and noise")
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default=t.beta_schedule,
                   help=f"the DDPM noise schedule (default {t.beta_schedule})")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
