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
A row sent to augmentation has no action (None) until `settle` gives it one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

import transforms

from pipeline.fields import check_choices, setting
from pipeline.io.data import ImageSpec, center_crop_resize, to_tensor
from pipeline.decide.clusters import keeper_of
from pipeline.decide.flagging import Threshold, accept, flag
from pipeline.score.complexity import complexity
from pipeline.score.scoring import fresh_scores
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
    cluster_on_failure: str = setting("keep", "what a duplicate cluster's flagged keeper becomes when no "
                                      "augmentation lands in the accept band: keep (the picture stays once, flagged, "
                                      "its copies dropped; on the demo, retraining on it memorized nothing: benchmarks/"
                                      "closed_loop.py, one seed) or failure (as --on-failure says)",
                                      choices=("keep", "failure"))
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
         settings: RemediationSettings) -> tuple[list[str | None], list[str | None], np.ndarray]:
    """First decision per row: (action, reason, augment?) before any augmentation runs; a row
    to augment has action None until `settle` decides it."""
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
            action.append(None), reason.append(None)  # settled once its augmentations are scored
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
    volume: float | None = None  # the last attempt's V (log_volume_growth), whatever score is judged


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


def rescore(model, x: torch.Tensor, scorer: ScorerSettings, judge: Callable[[dict[str, np.ndarray]], np.ndarray],
            data_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The judged score and V of images [B, C, H, W] (the model's data range), scored as the run
    scores its inputs (every column, and their complexity) and judged by `judge` (the run's
    score, with its calibration unchanged): -> ([B], [B])."""
    rows = fresh_scores(model, x, scorer)
    cols = {c: np.array([r[c] for r in rows], dtype=np.float64) for c in rows[0]}
    cols["complexity"] = np.array([complexity(image, data_range) for image in x])
    return judge(cols), cols["log_volume_growth"]


def augment_and_rescore(images: dict[str, tuple[Image.Image, str]], model, spec: ImageSpec,
                        scorer: ScorerSettings, threshold: Threshold, low: float | None,
                        judge: Callable[[dict[str, np.ndarray]], np.ndarray], settings: RemediationSettings,
                        folder: Path, batch_size: int = 16, device: str | torch.device = "cpu") -> dict[str, Attempt]:
    """Augment each image (id -> (full-size image in the model's mode, sha256)) and re-score it
    (`rescore` with `judge`), in rounds: every image whose variant is not yet accepted gets
    another try."""
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
            values, volumes = rescore(model, x, scorer, judge, spec.data_range)
            for (i, arr, record, level), v, vol in zip(made, values.tolist(), volumes.tolist()):
                buf = io.BytesIO()
                to_image(arr).save(buf, "PNG")
                why = verdict(v, threshold, low)
                results[i] = Attempt(why == "accepted", attempt + 1, transforms.PRESETS[level], v, record,
                                     save_png(folder, i, buf.getvalue()), level, why, vol)
        pending = [i for i in pending if not results[i].accepted]
        if not pending:
            break
    return results


def failed_action(settings: RemediationSettings, keeper: bool) -> tuple[str, str]:
    """(action, why) of a flagged image left without an accepted variant: a duplicate cluster's
    keeper stays, once (--cluster-on-failure keep), else --on-failure decides."""
    if keeper and settings.cluster_on_failure == "keep":
        return "kept", "kept as its duplicate cluster's one copy (--cluster-on-failure keep)"
    return ("dropped" if settings.on_failure == "drop" else "kept"), f"on failure: {settings.on_failure}"


def settle(action: list[str | None], reason: list[str | None], rows: dict[str, int], results: dict[str, Attempt],
           threshold: Threshold, low: float | None, settings: RemediationSettings,
           keepers: set[str] = frozenset()) -> None:
    """The final action of each row sent to augmentation (id -> row): augmented when its last
    variant is accepted, else as failed_action says (`keepers`: the ids that keep a duplicate
    cluster). A row with no result changed since it was scored (data.read_verified): it stays
    undecided, and reject_changed rejects it."""
    band = f"[{'-inf' if low is None else format(low, '.4g')}, {threshold.value:.4g}]"
    for id_, row in rows.items():
        a = results.get(id_)
        if a is None:
            continue
        if a.accepted:
            action[row] = "augmented"
            reason[row] = f"{a.preset} augmentation re-scored {a.score:.4g}, inside the accept band {band}"
        else:
            action[row], why = failed_action(settings, id_ in keepers)
            reason[row] = (f"no augmentation in {a.tries} tries scored inside the accept band {band} "
                           f"(last {a.preset} {a.score:.4g}: {a.verdict}); {why}")


CHANGED = "changed_during_run"  # the reject reason of an input whose bytes changed after scoring
CHANGED_COLUMNS = ("status", "reject_reason", "flagged", "flag_reason", "dup_cluster", "dup_of", "dup_similarity",
                   "action", "action_reason", "augmented_png")  # what reject_changed may rewrite


def reject_changed(decided: pa.Table, changed: set[str], score: str, settings: RemediationSettings) -> pa.Table:
    """The decisions made consistent again after inputs changed (or vanished) between their
    scoring and a re-read (data.read_verified): each becomes rejected (changed_during_run),
    unflagged and out of its cluster; the copies that named it as keeper get a new one, their
    lowest-risk member (ties by id, as clusters choose keepers), whose action is planned afresh
    as a keeper's (a flagged one that would be augmented is handled as a failed augmentation:
    augmentation has run by then); and a cluster left with one member is no cluster.
    `score` is the risk column. Only the decision columns (CHANGED_COLUMNS) change."""
    ids = decided.column("id").to_pylist()
    hit = [i in changed for i in ids]
    if not any(hit):
        return decided
    c = {name: decided.column(name).to_pylist() for name in CHANGED_COLUMNS}
    risk = decided.column(score).to_pylist()
    gone = {}  # changed id -> its own dup_of (an earlier output's image its cluster duplicates)
    for r in np.flatnonzero(hit):
        gone[ids[r]] = c["dup_of"][r]
        for name, value in (("status", "rejected"), ("reject_reason", CHANGED), ("action", "rejected"),
                            ("action_reason", "its bytes changed after it was scored: what was judged is not what "
                                              "would be written")):
            c[name][r] = value
        for name in ("flagged", "flag_reason", "dup_cluster", "dup_of", "dup_similarity", "augmented_png"):
            c[name][r] = None
    orphans: dict[str, list[int]] = {}
    for r, of in enumerate(c["dup_of"]):
        if of in gone:
            orphans.setdefault(of, []).append(r)
    for old, rows in orphans.items():
        _new_keeper(c, ids, risk, rows, old, gone[old], settings)
    members: dict[int, list[int]] = {}
    for r, k in enumerate(c["dup_cluster"]):
        if k is not None:
            members.setdefault(k, []).append(r)
    for rows in members.values():
        if len(rows) == 1:  # alone: no cluster (a duplicate of an earlier output stays one)
            c["dup_cluster"][rows[0]] = None
            if c["dup_of"][rows[0]] is None:
                c["dup_similarity"][rows[0]] = None
    for name in CHANGED_COLUMNS:
        decided = decided.set_column(decided.schema.get_field_index(name), name,
                                     pa.array(c[name], decided.schema.field(name).type))
    return decided


def _new_keeper(c: dict[str, list], ids: list[str], risk: list, rows: list[int], old: str, inherited: str | None,
                settings: RemediationSettings) -> None:
    """Rows that were copies of `old` (now rejected) take their lowest-risk member as keeper; it
    inherits `old`'s own duplicate of an earlier output, if any, and its action is planned again."""
    keeper = keeper_of(rows, risk, ids)
    for r in rows:
        c["dup_of"][r] = ids[keeper] if r != keeper else inherited
        if r != keeper and c["action"][r] == "dropped":
            c["action_reason"][r] = f"duplicate of {ids[keeper]}"
    action, reason, augment = plan(np.ones(1, bool), np.array([bool(c["flagged"][keeper])]), [inherited], settings)
    if augment[0]:
        action[0], why = failed_action(settings, keeper=len(rows) > 1)
        reason[0] = f"flagged; no augmentation tried: {old} changed during the run and it became its cluster's keeper " \
                    f"after augmentation had run; {why}"
    elif reason[0] is None or action[0] == "kept":
        reason[0] = "; ".join(filter(None, [reason[0], f"its cluster's keeper {old} changed during the run"]))
    c["action"][keeper], c["action_reason"][keeper] = action[0], reason[0]


def record_json(a: Attempt) -> str:
    return json.dumps(a.record, sort_keys=True)


def save_png(folder: Path, id_: str, png: bytes) -> Path:
    """Keep an augmented image on disk until it is written to cleaned/ (not in memory)."""
    path = folder / (hashlib.sha256(id_.encode()).hexdigest()[:24] + ".png")
    path.write_bytes(png)
    return path


@dataclass(frozen=True)
class GuardSettings:
    """A guard against emptying a dataset: a run whose decisions would remove more of its
    pictures than this is refused before anything is committed."""

    max_loss_fraction: float = setting(0.5, "refuse a run that would remove more than this share of its scored "
                                       "pictures (exact copies dropped beside a kept twin remove nothing); its plan "
                                       "(scores, flags, report) is written to OUT.plan instead; 1: no guard")

    def __post_init__(self) -> None:
        if not 0 < self.max_loss_fraction <= 1:
            raise ValueError(f"--max-loss-fraction must lie in (0, 1], got {self.max_loss_fraction}")

    def refusal(self, lost: dict[str, int]) -> str | None:
        """Why a run with these losses (`losses`) is refused, or None when it passes."""
        share = lost["removed"] / lost["scored"] if lost["scored"] else 0.0
        if share <= self.max_loss_fraction:
            return None
        return (f"this run would remove {lost['removed']} of its {lost['scored']} scored pictures ({share:.0%}), more "
                f"than --max-loss-fraction {self.max_loss_fraction:g}: {lost['near_duplicate']} joined as near "
                f"duplicates, {lost['failed_augmentation']} whose augmentation failed, {lost['flagged']} dropped as "
                f"flagged, {lost['other']} other")


LOSS_REASONS = {"near_duplicate": "duplicate of", "failed_augmentation": "no augmentation", "flagged": "flagged"}


def losses(decided: pa.Table, against: Sequence[str] = ()) -> dict[str, int]:
    """The pictures a run's decisions would take out of the dataset, by reason (near_duplicate,
    failed_augmentation, flagged, other) and in all (`removed`), out of the inputs scored
    (`scored`). A dropped row removes nothing when a kept or augmented row has its decoded
    pixels (an exact copy beside its twin), or when it duplicates an image of an earlier output
    it was cleaned against (`against`: check_against's list; that picture is in the dataset
    already; counted as `in_earlier_output`); any other drop removes a picture. Arrow only."""
    import pyarrow.compute as pc

    action = decided.column("action")
    kept = decided.filter(pc.fill_null(pc.is_in(action, pa.array(["kept", "augmented"])), False))
    dropped = decided.filter(pc.fill_null(pc.equal(action, "dropped"), False))
    twin = pc.fill_null(pc.is_in(dropped.column("pixel_sha256"), kept.column("pixel_sha256").combine_chunks()), False)
    earlier = pc.is_null(dropped.column("action"))  # all False
    if isinstance(against, str):
        raise TypeError("losses takes check_against's list of outputs, not --against's text")
    for prev in against:
        earlier = pc.or_(earlier, pc.fill_null(pc.starts_with(dropped.column("dup_of"), f"{prev}:"), False))
    gone = dropped.filter(pc.invert(pc.or_(twin, earlier)))
    reason = pc.fill_null(gone.column("action_reason"), "")
    out, counted = {}, None
    for name, prefix in LOSS_REASONS.items():
        hit = pc.starts_with(reason, prefix)
        out[name] = int(pc.sum(hit).as_py() or 0)
        counted = hit if counted is None else pc.or_(counted, hit)
    out["other"] = gone.num_rows - sum(out.values())
    out["removed"] = gone.num_rows
    out["in_earlier_output"] = int(pc.sum(earlier).as_py() or 0)
    out["scored"] = int(pc.sum(pc.equal(decided.column("status"), "ok")).as_py() or 0)
    return out
