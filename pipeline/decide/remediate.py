"""Remediation: what happens to each input once it is scored, flagged and clustered.

    auto     collapse duplicate clusters (keep the lowest-risk member), then replace every
             flagged survivor by an augmented variant that re-scores below the threshold
    dedup    collapse duplicate clusters only
    augment  replace flagged images by augmented variants only (no dedup)
    drop     drop flagged images
    none     flag only; everything that decodes is kept
An augmentation is accepted only if its re-score (same model and settings) would not be flagged
and lies in the band of ordinary unmemorized images (at or above the --accept-band quantile of
their scores): a replacement far below every held-out image is no longer an image like the
others. Each try draws a new seed; the preset rises (light -> medium -> strong) after a score
above the threshold and falls back after one below the band. After the last try the image is
dropped or kept-and-flagged, as --on-failure says.

This module owns a row's action, from the first decision (`plan`) through augmentation
(`settle`) to inputs that changed during the run (`reject_changed`); nothing else sets it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

import transforms

from pipeline.fields import check_choices, setting
from pipeline.io.data import ImageSpec, center_crop_resize, to_tensor
from pipeline.decide.flagging import Threshold, accept, flag
from pipeline.score.scoring import score_images
from pipeline.score.volume import ScorerSettings

log = logging.getLogger(__name__)

ACTION_MODES = ("auto", "dedup", "augment", "drop", "none")
ON_FAILURE = ("drop", "keep")


@dataclass(frozen=True)
class RemediationSettings:
    """How flagged and duplicated images are handled."""

    action: str = setting("auto", "auto: dedup, then augment flagged survivors; dedup; augment; drop flagged; none",
                          choices=ACTION_MODES)
    tries: int = setting(3, "augmentations per image, each with a new seed; the preset rises (light -> medium -> "
                         "strong) after a variant above the threshold and falls after one below the band (at most 20)",
                         name="augment_tries")
    on_failure: str = setting("drop", "what happens to an image no augmentation brought into the accept band",
                              choices=ON_FAILURE)
    seed: int = setting(0, "augmentation seed, mixed with each image's sha256 and the try number", name="augment_seed")
    accept_band: float = setting(0.01, "a variant is accepted only at or above this quantile of ordinary images' "
                                 "scores (the reference's, else the dataset's) and not above the threshold: "
                                 "replacements must stay in distribution; 0 for no floor")

    def __post_init__(self) -> None:
        check_choices(self)
        if not 1 <= self.tries <= 20:
            raise ValueError(f"--augment-tries must be between 1 and 20, got {self.tries}")
        if not 0 <= self.accept_band < 0.5:
            raise ValueError(f"--accept-band is a low quantile in [0, 0.5), got {self.accept_band}")

    @property
    def dedups(self) -> bool:
        return self.action in ("auto", "dedup")

    @property
    def augments(self) -> bool:
        return self.action in ("auto", "augment")

    def to_dict(self) -> dict:
        return asdict(self)


def plan(ok: np.ndarray, flagged: np.ndarray, dup_of: list[str | None],
         settings: RemediationSettings) -> tuple[list[str], list[str | None], np.ndarray]:
    """First decision per row: (action, reason, augment?) before any augmentation runs."""
    action, reason = [], []
    augment = np.zeros(len(ok), dtype=bool)
    for i in range(len(ok)):
        if not ok[i]:
            action.append("rejected"), reason.append("could not be decoded")
        elif settings.dedups and dup_of[i] is not None:
            action.append("dropped"), reason.append(f"duplicate of {dup_of[i]}")
        elif flagged[i] and settings.action == "drop":
            action.append("dropped"), reason.append("flagged")
        elif flagged[i] and settings.augments:
            action.append("augmented"), reason.append(None)  # settled by augment_and_rescore
            augment[i] = True
        else:
            action.append("kept"), reason.append("flagged; kept as --action says" if flagged[i] else None)
    return action, reason, augment


def augmentation_seed(seed: int, sha256: str, attempt: int) -> int:
    h = hashlib.sha256(f"memclean-augment:{seed}:{sha256}:{attempt}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def to_array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


@dataclass
class Attempt:
    """The outcome of remediating one flagged image."""

    accepted: bool  # its last try scored inside the accept band
    tries: int  # attempts made
    preset: str  # preset of the last attempt
    score: float  # re-score of the last attempt
    record: dict  # the albumentations record of the last attempt (replay reproduces it)
    png: Path  # the last attempt, losslessly encoded, on disk until cleaned/ is written
    level: int = 0  # preset index of the last attempt
    verdict: str = ""  # accepted | above the threshold | below the accept band | not finite


def verdict(score: float, threshold: Threshold, low: float | None) -> str:
    if bool(accept(np.array([score]), threshold, low)[0]):
        return "accepted"
    if not np.isfinite(score):
        return "not finite"
    return "above the threshold" if bool(flag(np.array([score]), threshold)[0]) else "below the accept band"


def next_level(a: Attempt) -> int:
    """The next try's preset: stronger after a score above the threshold, milder after one below the band."""
    step = 1 if a.verdict == "above the threshold" else -1
    return min(max(a.level + step, 0), len(transforms.PRESETS) - 1)


def augment_and_rescore(images: dict[str, tuple[Image.Image, str]], model, spec: ImageSpec,
                        scorer: ScorerSettings, threshold: Threshold, low: float | None, score_name: str,
                        settings: RemediationSettings, folder: Path, batch_size: int = 16,
                        device: str | torch.device = "cpu",
                        progress: Callable[[int], None] | None = None) -> dict[str, Attempt]:
    """Augment each image (id -> (full-size image in the model's mode, sha256)) and re-score,
    in rounds: every image whose variant is not yet accepted gets another try."""
    results: dict[str, Attempt] = {}
    pending = sorted(images)
    for attempt in range(settings.tries):
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            made = []
            for i in chunk:
                img, sha = images[i]
                level = next_level(results[i]) if i in results else 0
                arr, record = transforms.apply(transforms.PRESETS[level], to_array(img),
                                               augmentation_seed(settings.seed, sha, attempt))
                made.append((i, arr, record, level))
            x = torch.stack([to_tensor(center_crop_resize(to_image(a), spec.size), spec.data_range)
                             for _, a, _, _ in made]).to(device)
            values = getattr(score_images(model, x, scorer), score_name).tolist()
            for (i, arr, record, level), v in zip(made, values):
                buf = io.BytesIO()
                to_image(arr).save(buf, "PNG")
                why = verdict(v, threshold, low)
                results[i] = Attempt(why == "accepted", attempt + 1, transforms.PRESETS[level], v, record,
                                     save_png(folder, i, buf.getvalue()), level, why)
            if progress:
                progress(len(chunk))
        pending = [i for i in pending if not results[i].accepted]
        if not pending:
            break
    return results


def settle(action: list[str], reason: list[str | None], rows: dict[str, int], results: dict[str, Attempt],
           threshold: Threshold, low: float | None, on_failure: str) -> None:
    """The final action of each row sent to augmentation (id -> row): augmented when its last
    variant is accepted, else dropped or kept as on_failure says, or dropped when the image could
    not be read again."""
    band = f"[{'-inf' if low is None else format(low, '.4g')}, {threshold.value:.4g}]"
    for id_, row in rows.items():
        a = results.get(id_)
        if a is None:
            action[row], reason[row] = "dropped", "could not be re-read for augmentation"
        elif a.accepted:
            action[row] = "augmented"
            reason[row] = f"{a.preset} augmentation re-scored {a.score:.4g}, inside the accept band {band}"
        else:
            action[row] = "dropped" if on_failure == "drop" else "kept"
            reason[row] = (f"no augmentation in {a.tries} tries scored inside the accept band {band} "
                           f"(last {a.preset} {a.score:.4g}: {a.verdict}); on failure: {on_failure}")


def reject_changed(ids: list[str], action: list[str], changed: set[str]) -> list[bool]:
    """Inputs whose bytes changed between scoring and writing end rejected (their score is of
    other bytes); returns which rows that turned."""
    hit = [i in changed for i in ids]
    for k, h in enumerate(hit):
        if h:
            action[k] = "rejected"
    return hit


def record_json(a: Attempt) -> str:
    return json.dumps(a.record, sort_keys=True)


def save_png(folder: Path, id_: str, png: bytes) -> Path:
    """Keep an augmented image on disk until it is written to cleaned/ (not in memory)."""
    path = folder / (hashlib.sha256(id_.encode()).hexdigest()[:24] + ".png")
    path.write_bytes(png)
    return path
