"""Score a stream of images into rows: decode in batches, solve, one row per input."""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Iterator

import torch

from pipeline.io.data import Decoded, ImageSpec, Item, batched
from pipeline.io.prefetch import prefetch
from pipeline.score.cache import SCORE_COLUMNS, ScoreCache
from pipeline.score.complexity import codec, complexity
from pipeline.score.loss import LossResult, denoising_loss
from pipeline.score.models import LoadedModel
from pipeline.score.probes import image_keys
from pipeline.score.volume import ScorerSettings, VolumeResult, log_volume_growth

log = logging.getLogger(__name__)

# the columns a fresh score must have finite (a standard error may be NaN: an adaptive solver's)
FINITE = ("log_volume_growth", "prior_logp", "logp", "bits_per_dim", "window_volume_growth")
OPTIONAL = ("log_volume_growth_se", "window_volume_growth_se", "denoising_loss", "denoising_loss_se")  # may be null


def image_spec(model: LoadedModel, max_pixels: int = ImageSpec.max_pixels,
               min_size: int = ImageSpec.min_size) -> ImageSpec:
    """What `model` takes, with the input limits."""
    return ImageSpec(model.channels, model.sample_size, max_pixels, min_size, model.data_range)


def format_range(data_range: tuple[float, float]) -> str:
    return f"[{data_range[0]:g}, {data_range[1]:g}]"


def base_row(d: Decoded) -> dict:
    """The identity and status columns of one input."""
    w, h = d.original_size or (None, None)
    return {"id": d.item.id, "path": d.item.path, "sha256": d.sha256, "pixel_sha256": d.pixel_sha256,
            "path_bytes": d.item.path_bytes, "sidecar": d.item.sidecar, "width": w, "height": h,
            "status": "rejected" if d.reject_reason else "ok", "reject_reason": d.reject_reason}


def score_images(model: LoadedModel, x: torch.Tensor, settings: ScorerSettings,
                 progress: Callable[[int], None] | None = None, keys: list[int] | None = None) -> VolumeResult:
    """Images in the model's data range [B, C, H, W] -> their V (and log p) with its window and
    standard errors. A latent pipeline's images go through its encoder first, with probes keyed
    by the images themselves (the latent's float rounding may depend on the batch; the image's
    bytes do not). keys: the images' image_keys, when the caller has them already."""
    if keys is None and model.encoder is not None:
        keys = image_keys(settings.seed, x)
    return log_volume_growth(model.score_fn, model.prepare(x), settings, progress, keys)


def loss_images(model: LoadedModel, x: torch.Tensor, settings: ScorerSettings,
                keys: list[int] | None = None) -> LossResult | None:
    """Images [B, C, H, W] -> their denoising loss at settings.loss_t (None with no noises), in the
    space the model diffuses (a latent pipeline's latent), noises keyed by the images (keys: their
    image_keys, when the caller has them already)."""
    if not settings.loss_noises:
        return None
    keys = image_keys(settings.seed, x) if keys is None else keys
    with torch.no_grad():
        z = model.prepare(x)
    return denoising_loss(model.score_fn, z, settings.loss_t, settings.loss_noises, settings.seed, keys)


def fresh_scores(model: LoadedModel, x: torch.Tensor, settings: ScorerSettings,
                 progress: Callable[[int], None] | None = None) -> list[dict]:
    """The SCORE_COLUMNS of each image of a batch, solved now: [B, C, H, W] -> B dicts."""
    # the images' keys once, where probes, noises or a latent need them: hashing them copies the
    # batch to the host (on a GPU, a synchronisation)
    needed = settings.divergence != "exact" or bool(settings.loss_noises) or model.encoder is not None
    keys = image_keys(settings.seed, x) if needed else None
    v, loss = score_images(model, x, settings, progress, keys), loss_images(model, x, settings, keys)
    columns = {c: getattr(v, c) for c in SCORE_COLUMNS if not c.startswith("denoising")}
    nan = torch.full((x.shape[0],), float("nan"), dtype=torch.float64)
    columns["denoising_loss"] = nan if loss is None else loss.denoising_loss
    columns["denoising_loss_se"] = nan if loss is None else loss.denoising_loss_se
    values = {c: columns[c].cpu().tolist() for c in SCORE_COLUMNS}  # one copy to the host a column
    return [{c: values[c][i] for c in SCORE_COLUMNS} for i in range(x.shape[0])]


def score_batch(model: LoadedModel, batch: list[Decoded], settings: ScorerSettings,
                device: str | torch.device = "cpu",
                progress: Callable[[int], None] | None = None,
                cache: ScoreCache | None = None) -> list[dict]:
    """Rows for one decoded batch: scores for the decodable images (from `cache` where it has
    them, solved otherwise), nulls for the rejected. `reused` says which came from the cache."""
    shape = model.latent_shape
    settings_cols = {**settings.to_dict(), "model_fingerprint": model.fingerprint,
                     "data_range": format_range(model.data_range), "score_space": model.score_space,
                     "latent_shape": None if shape is None else "x".join(map(str, shape)),
                     "complexity_codec": codec()}
    ok = [d for d in batch if d.pixels is not None]
    scores: dict[int, dict] = {}
    if cache is not None:
        for d in ok:
            hit = cache.get(d.sha256)
            if hit is not None:
                scores[id(d)] = {**hit, "reused": True}
    todo = [d for d in ok if id(d) not in scores]
    if todo:
        x = torch.stack([d.pixels for d in todo]).to(device)
        fresh = fresh_scores(model, x, settings, progress)
        must = FINITE + (("denoising_loss",) if settings.loss_noises else ())
        finite = [all(math.isfinite(row[c]) for c in must) for row in fresh]
        for d, row, good in zip(todo, fresh, finite):
            scores[id(d)] = {**row, "reused": False} if good else NON_FINITE
            if not good:
                log.warning("%s: the model gave a non-finite score (%s); the image is rejected", d.item.path,
                            ", ".join(f"{c}={row[c]}" for c in must))
        if cache is not None:  # never cache a score that is not a number
            cache.put([{**row, "sha256": d.sha256} for d, row, good in zip(todo, fresh, finite) if good])
    if progress and len(ok) > len(todo):
        progress(len(ok) - len(todo))
    rows = []
    for d in batch:
        if d.reject_reason:
            log.warning("rejected %s: %s %s", d.item.path, d.reject_reason, d.reject_detail)
            if progress:
                progress(1)
        empty = {**dict.fromkeys(SCORE_COLUMNS), "reused": None}
        row = {**base_row(d), **scores.get(id(d), empty), **settings_cols}
        row["passes"] = 1 if row["status"] == "ok" else None  # a rejected row averaged no score
        row["complexity"] = None if row["status"] != "ok" else \
            d.complexity if d.complexity is not None else complexity(d.pixels, model.data_range)
        for c in OPTIONAL:  # not estimated (an adaptive solver's standard error; no loss): null, not NaN
            if row[c] is not None and math.isnan(row[c]):
                row[c] = None
        rows.append(row)
    return rows


# a score the model made NaN or infinite: the row is rejected, with no number in it
NON_FINITE = {**dict.fromkeys(SCORE_COLUMNS), "reused": None, "status": "rejected",
              "reject_reason": "non_finite_score"}


def score_items(model: LoadedModel, items: Iterable[Item], settings: ScorerSettings,
                spec: ImageSpec | None = None, batch_size: int = 16,
                device: str | torch.device = "cpu",
                progress: Callable[[int], None] | None = None) -> Iterator[list[dict]]:
    """Rows for every item, a batch at a time, in input order (decoded ahead: `prepared`)."""
    for batch in prepared(model, batched(items, spec or image_spec(model), batch_size)):
        yield score_batch(model, batch, settings, device, progress)


def prepared(model: LoadedModel, batches: Iterable[list[Decoded]], depth: int = 2) -> Iterator[list[Decoded]]:
    """Decoded batches read `depth` ahead in a background thread, each decodable image's complexity
    worked out there too, so that the CPU's part of a batch overlaps the network's."""
    def work(batch: list[Decoded]) -> list[Decoded]:
        for d in batch:
            if d.pixels is not None and not d.reject_reason:
                d.complexity = complexity(d.pixels, model.data_range)
        return batch
    return prefetch(batches, depth, work)
