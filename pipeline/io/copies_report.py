"""The report of `memclean verify`: OUT/report.html, each copied training picture beside the
generations that copy it, with the counts, both tests and the flags held against the copies.
Self-contained like the clean report (io/report.py: its CSS and thumbnails under OUT/report/)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.io.report import CSS, ERROR_JS, SORT_JS, THUMBS, esc, save_thumbnail, table
from pipeline.io.store import write_atomic

SHOWN_PICTURES = 48  # copied pictures shown, most copied first
SHOWN_GENERATIONS = 6  # generations shown beside each, closest first


def to_pil(image: np.ndarray, data_range: tuple[float, float]) -> Image.Image:
    """[C, H, W] in the data range -> an 8-bit PIL image."""
    lo, hi = data_range
    arr = np.clip(np.round((np.asarray(image) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def gallery(folder: Path, gens: np.ndarray, pixels: np.ndarray, ids: list[str], groups: np.ndarray, near: np.ndarray,
            copy: np.ndarray, d1: np.ndarray, data_range: tuple[float, float]) -> str:
    """Thumbnails into folder/report/ and the gallery's HTML: per copied picture, its training
    image nearest to the closest generation, and the generations that copy it."""
    thumbs = folder / THUMBS
    thumbs.mkdir(exist_ok=True)
    shape = gens.shape[1:]
    copying = np.flatnonzero(copy)
    pictures, counts = np.unique(groups[near[copying]], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:SHOWN_PICTURES]
    parts = []
    for p in pictures[order]:
        mine = copying[groups[near[copying]] == p]
        mine = mine[np.argsort(d1[mine], kind="stable")]
        t = near[mine[0]]
        key = f"train:{ids[t]}"
        name = save_thumbnail(to_pil(np.asarray(pixels[t]).reshape(shape), data_range), thumbs, key)
        cards = [f'<div class="card keeper"><img src="{THUMBS}/{name}" alt="{esc(ids[t])}">'
                 f'<div><b>{esc(ids[t])}</b></div><div>training image</div></div>']
        for g in mine[:SHOWN_GENERATIONS]:
            gname = save_thumbnail(to_pil(gens[g], data_range), thumbs, f"generation:{g}")
            cards.append(f'<div class="card"><img src="{THUMBS}/{gname}" alt="generation {g}">'
                         f'<div>generation {g}</div><div>L2 {d1[g]:.3g}</div></div>')
        more = f"<p class='muted'>and {len(mine) - SHOWN_GENERATIONS} more</p>" if len(mine) > SHOWN_GENERATIONS else ""
        parts.append(f"<h3>{esc(ids[t])}: {len(mine)} generation(s)</h3><div class='row'>{''.join(cards)}</div>{more}")
    if len(pictures) > SHOWN_PICTURES:
        parts.append(f"<p class='muted'>{len(pictures) - SHOWN_PICTURES} more copied pictures: copied.parquet</p>")
    return "\n".join(parts) or "<p>No generation copies a training picture.</p>"


def write_verify_report(folder: Path, m: dict[str, Any], gens: np.ndarray, pixels: np.ndarray, rows: list[dict],
                        groups: np.ndarray, near: np.ndarray, copy: np.ndarray, d1: np.ndarray, data_range: tuple[float, float]) -> Path:
    """folder/report.html for a verify run (manifest `m`, before its timings)."""
    c, s = m["copies"], m["similar"]
    summary = [{"generations": m["generations"], "copies": c["generations"], "rate": c["rate"],
                "95% interval": f"{c['interval95'][0]:.3f}-{c['interval95'][1]:.3f}",
                "copied pictures": c["copied_pictures"], "copied images": c["copied_images"],
                "similar (embedder)": s["generations"], "both tests": m["both"]}]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>memclean verify</title>"
             f"<style>{CSS}</style><script>{ERROR_JS}</script></head><body>",
             "<h1>memclean verify report</h1>",
             f"<p class='muted'>{esc(m['model']['path'])}: {m['generations']} generations against "
             f"{esc(m['data']['path'])} &rarr; {esc(m['out'])}</p>",
             "<h2>Copies</h2>", table(summary, list(summary[0])),
             f"<p>A generation copies a training picture when its nearest training image is closer than "
             f"{esc(c['test'])}; copies of one picture ({esc(m['training']['groups'])}) count as one. The second test: "
             f"the {esc(s['embedder'])} embedder's similarity at or above {s['threshold']['value']:.4g} "
             f"({esc(s['threshold']['mode'])}).</p>"]
    f = m.get("flags")
    if f:
        parts += ["<h2>The clean run's flags against the copies</h2>",
                  table([{"copied images": f["copied_images"], "flagged (recall)": f["recall"],
                          "flag rate, not copied": f["flag_rate_not_copied"], "removed": f["removed_copied"]}],
                        ["copied images", "flagged (recall)", "flag rate, not copied", "removed"]),
                  "<p>AUC of each score, copied vs not copied training images (judged: "
                  f"{esc(f['judged'])}):</p>", table([f["auc"]], list(f["auc"]))]
    parts += ["<h2>Copied training images and the generations that copy them</h2>",
              gallery(folder, gens, pixels, [r["id"] for r in rows], groups, near, copy, d1, data_range),
              "<h2>Model and settings</h2>",
              f"<pre>{esc(json.dumps({'model': m['model'], 'settings': m['settings']}, indent=2))}</pre>",
              f"<script>{SORT_JS}</script></body></html>"]
    return write_atomic(folder / "report.html", "\n".join(parts))
