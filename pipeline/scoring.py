"""Score a stream of images into rows: decode in batches, solve, one row per input."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

import torch

from .data import Decoded, ImageSpec, Item, batched
from .models import LoadedModel
from .volume import ScorerSettings, log_volume_growth

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("log_volume_growth", "prior_logp", "logp", "bits_per_dim", "nfe")


def image_spec(model: LoadedModel, max_pixels: int = ImageSpec.max_pixels,
               min_size: int = ImageSpec.min_size) -> ImageSpec:
    """What `model` takes, with the input limits."""
    return ImageSpec(model.channels, model.sample_size, max_pixels, min_size)


def base_row(d: Decoded) -> dict:
    """The identity and status columns of one input."""
    w, h = d.original_size or (None, None)
    return {"id": d.item.id, "path": d.item.path, "sha256": d.sha256, "pixel_sha256": d.pixel_sha256,
            "path_bytes": d.item.path_bytes, "width": w, "height": h,
            "status": "rejected" if d.reject_reason else "ok", "reject_reason": d.reject_reason}


def score_batch(model: LoadedModel, batch: list[Decoded], settings: ScorerSettings,
                device: str | torch.device = "cpu",
                progress: Callable[[int], None] | None = None) -> list[dict]:
    """Rows for one decoded batch: scores for the decodable images, nulls for the rejected."""
    settings_cols = {**settings.to_dict(), "model_fingerprint": model.fingerprint}
    ok = [d for d in batch if d.pixels is not None]
    scores: dict[int, dict] = {}
    if ok:
        x = torch.stack([d.pixels for d in ok]).to(device)
        result = log_volume_growth(model.score_fn, x, settings, progress)
        for i, d in enumerate(ok):
            scores[id(d)] = {c: getattr(result, c)[i].item() for c in SCORE_COLUMNS}
    rows = []
    for d in batch:
        if d.reject_reason:
            log.warning("rejected %s: %s %s", d.item.path, d.reject_reason, d.reject_detail)
            if progress:
                progress(1)
        rows.append({**base_row(d), **scores.get(id(d), dict.fromkeys(SCORE_COLUMNS)), **settings_cols})
    return rows


def score_items(model: LoadedModel, items: Iterable[Item], settings: ScorerSettings,
                spec: ImageSpec | None = None, batch_size: int = 16,
                device: str | torch.device = "cpu",
                progress: Callable[[int], None] | None = None) -> Iterator[list[dict]]:
    """Rows for every item, a batch at a time, in input order."""
    for batch in batched(items, spec or image_spec(model), batch_size):
        yield score_batch(model, batch, settings, device, progress)
