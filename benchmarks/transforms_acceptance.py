"""Which single transform brings a flagged image into the accept band: each transform of the
presets alone (and a small crop), on the images a default clean run sends to augmentation.

    .venv/bin/python benchmarks/transforms_acceptance.py [--sets digits photos] [--seeds 3] [--no-write]

Each set is cleaned by `memclean clean` at its defaults (the held-out images as the reference);
the flagged survivors of dedup are then augmented by one transform at a time (p = 1, at the
`medium` preset's strength), re-scored with the run's model, scorer settings and calibration
(remediate.rescore, the code remediation uses), and judged against the run's threshold and
accept band. Reported: the share accepted at the first seed and at any of --seeds seeds, and
the median re-score against the band. Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.acceptance import SETS as EVIDENCE_SETS  # noqa: E402
from benchmarks.results import hardware, publish  # noqa: E402
from pipeline.decide.flagging import Threshold, accept  # noqa: E402
from pipeline.decide.remediate import rescore, to_array, to_image  # noqa: E402
from pipeline.decide.scores import judge_scores  # noqa: E402
from pipeline.io.data import center_crop_resize, discover, open_image, to_tensor  # noqa: E402
from pipeline.io.store import ok_mask  # noqa: E402
from pipeline.run.lifecycle import run_clean  # noqa: E402
from pipeline.run.resources import resources  # noqa: E402
from pipeline.run.settings import RunSettings  # noqa: E402
from pipeline.score.scoring import image_spec  # noqa: E402

SETS = {name: paths for name, paths in EVIDENCE_SETS.items() if name != "digits2"}  # the shipped sets


def single_transforms():
    import albumentations as A

    reflect = 4
    return {
        "horizontal flip": A.HorizontalFlip(p=1.0),
        "small crop (90-100%)": A.RandomResizedCrop(size=(1, 1), scale=(0.9, 1.0), ratio=(1, 1), p=1.0),
        "affine (medium)": A.Affine(translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), rotate=(-10, 10),
                                    border_mode=reflect, p=1.0),
        "brightness/contrast 0.2": A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
        "gauss noise 0.02-0.05": A.GaussNoise(std_range=(0.02, 0.05), p=1.0),
        "coarse dropout": A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.05, 0.15),
                                          hole_width_range=(0.05, 0.15), p=1.0),
    }


def apply(op, arr: np.ndarray, seed: int) -> np.ndarray:
    import albumentations as A

    if isinstance(op, A.RandomResizedCrop):  # its output size is the image's own
        op = A.RandomResizedCrop(size=arr.shape[:2], scale=op.scale, ratio=op.ratio, p=1.0)
    compose = A.Compose([op])
    compose.set_random_seed(seed)
    return compose(image=arr)["image"]


def measure(name: str, seeds: int, work: Path) -> list[str]:
    data, model_dir = SETS[name]
    settings = RunSettings.from_flat({"data": str(data / "train"), "reference": str(data / "heldout"),
                                      "model": str(model_dir), "out": str(work / name), "no_cache": True})
    manifest = run_clean(settings)
    table = pq.read_table(work / name / "scores.parquet")
    reference = pq.read_table(work / name / "reference_scores.parquet")
    score = manifest["threshold"]["score"]
    j = judge_scores(table, ok_mask(table), reference, score)
    judge = partial(j.judge, name=score)
    t = manifest["threshold"]
    threshold = Threshold(t["value"], t["policy"], t.get("parameters", {}), t.get("details", {}))
    low = t["details"]["accept_band"][0]
    model = resources().model(settings.model)
    spec = image_spec(model, settings.input.max_pixels, settings.input.min_size)
    tried = set(r["id"] for r in table.select(["id", "augment_tries"]).to_pylist() if r["augment_tries"] is not None)
    images = {item.id: to_array(open_image(item.read(), spec)) for item in discover(str(data / "train"))
              if item.id in tried}
    lines = []
    for label, op in single_transforms().items():
        hits = np.zeros((len(images), seeds), bool)
        first_scores = []
        for s in range(seeds):
            x = torch.stack([to_tensor(center_crop_resize(to_image(apply(op, a, 1000 * s + k)), spec.size),
                                       spec.data_range) for k, a in enumerate(images.values())])
            values = np.concatenate([rescore(model, x[b:b + 64], settings.scorer, judge, spec.data_range)[0]
                                     for b in range(0, len(x), 64)])
            hits[:, s] = accept(values, threshold, low)
            if s == 0:
                first_scores = values
        lines.append(f"| {name} | {label} | {len(images)} | {hits[:, 0].mean():.0%} | {hits.any(1).mean():.0%} | "
                     f"{np.median(first_scores):.4g} | [{low:.4g}, {threshold.value:.4g}] |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = ["| set | transform alone | flagged images | accepted, first seed | accepted, any of the seeds | "
             "median re-score | accept band |", "|---" * 7 + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            lines += measure(name, args.seeds, Path(tmp))
    text = (f"Hardware: {hardware()}. The flagged survivors of a default `memclean clean` of each set, each "
            f"augmented by one transform (p = 1, the medium preset's strength), {args.seeds} seeds, re-scored and "
            "judged as remediation does.\n\n" + "\n".join(lines))
    publish("transforms-acceptance", "Single transforms against the accept band: `benchmarks/transforms_acceptance.py`", text, write=not args.no_write)


if __name__ == "__main__":
    main()
