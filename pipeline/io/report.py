"""The HTML report: where the risk is, and what was done about it.

`write_thumbnails` (during a clean run) saves small PNGs of the images the report shows under
OUT/report/; `write_report` builds OUT/report.html from OUT's files alone, so `memclean report
OUT` can rebuild it. The page is self-contained: inline CSS, inline SVG histogram, a few lines
of inline JavaScript for sorting; images are relative links to OUT/report/; nothing external.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io.store import ok_mask, score_values, write_atomic

log = logging.getLogger(__name__)

THUMBS = "report"  # OUT/report/: thumbnails
TOP_FLAGGED = 60  # images in the flagged gallery
TOP_CLUSTERS = 30  # duplicate clusters shown
CLUSTER_MEMBERS = 8  # members shown per cluster
THUMB_SIZE = 128  # longest side of a stored thumbnail
REPORT_COLUMNS = ["id", "status", "flagged", "flag_reason", "dup_cluster", "dup_of", "dup_similarity", "action",
                  "action_reason", "augment_preset", "augmented_score"]  # what the page reads, less the score
TABLE_ROWS = 10_000  # rows of the flagged and duplicated table, highest score first (the rest: the Parquet)


def report_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows the report can show or list (flagged, in a duplicate cluster, pointing at an
    earlier output, or augmented) as dicts: the Arrow table is filtered first, so only these
    rows, never every input, become Python objects."""
    def true(name: str) -> pa.ChunkedArray:
        return pc.fill_null(table.column(name), False)

    keep = pc.or_(pc.or_(true("flagged"), pc.is_valid(table.column("dup_cluster"))),
                  pc.or_(pc.is_valid(table.column("dup_of")), pc.fill_null(pc.equal(table.column("action"), "augmented"),
                                                                           False)))
    return table.filter(keep).to_pylist()


def read_report_rows(path: str | os.PathLike, columns: list[str]) -> list[dict[str, Any]]:
    """report_rows of a scores.parquet, read a batch at a time (only `columns`): only the rows
    the report can show are ever held, never the whole table."""
    return scan_scores(path, columns)[0]


def scan_scores(path: str | os.PathLike, columns: list[str],
                score: str | None = None) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """One pass over a scores.parquet, a batch at a time: report_rows of `columns`, and with
    `score` (one of them, with status) the score of every ok row."""
    rows: list[dict[str, Any]] = []
    ok: list[np.ndarray] = []
    for batch in pq.ParquetFile(path).iter_batches(columns=columns):
        t = pa.Table.from_batches([batch])
        rows += report_rows(t)
        if score is not None:
            ok.append(score_values(t, score)[ok_mask(t)])
    if score is None:
        return rows, None
    return rows, np.concatenate(ok) if ok else np.zeros(0)


def read_ok_columns(path: str | os.PathLike, columns: list[str]) -> dict[str, np.ndarray]:
    """Some numeric columns of a scores table's ok rows (only they are read): name -> [ok rows],
    NaN where null (flagged: 1.0 or 0.0). Columns the table lacks (an older output) are left out."""
    names = [c for c in columns if c in pq.read_schema(path).names]
    t = pq.read_table(path, columns=sorted(set(names) | {"status"}))
    ok = ok_mask(t)
    return {c: t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)[ok] for c in names}


def read_ok_scores(path: str | os.PathLike, score: str) -> np.ndarray:
    """The score of every ok row of a scores table (two columns read, not the table)."""
    t = pq.read_table(path, columns=["status", score])
    return score_values(t, score)[ok_mask(t)]


def thumb_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:20] + ".png"


def save_thumbnail(img: Image.Image, folder: Path, key: str) -> str:
    """Save a thumbnail (nearest-neighbour upscaled if tiny, so pixels stay visible)."""
    img = img.convert("RGBA" if img.mode in ("RGBA", "LA") else "RGB")
    w, h = img.size
    scale = THUMB_SIZE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    name = thumb_name(key)
    img.save(folder / name)
    return name


def shown_rows(scores: list[dict[str, Any]], score: str) -> tuple[list[dict], dict[int, list[dict]], list[dict]]:
    """The rows the report shows: top flagged (one card per duplicate cluster, its highest-
    scoring flagged member), the largest duplicate clusters, augmented."""
    flagged, seen = [], set()
    for r in sorted((r for r in scores if r["flagged"]), key=lambda r: (-r[score], r["id"])):
        if r["dup_cluster"] is not None:
            if r["dup_cluster"] in seen:
                continue
            seen.add(r["dup_cluster"])
        flagged.append(r)
        if len(flagged) == TOP_FLAGGED:
            break
    clusters: dict[int, list[dict]] = {}
    for r in scores:
        if r["dup_cluster"] is not None:
            clusters.setdefault(r["dup_cluster"], []).append(r)
    biggest = sorted(clusters, key=lambda k: (-len(clusters[k]), k))[:TOP_CLUSTERS]
    shown_clusters = {k: sorted(clusters[k], key=lambda r: (r["dup_of"] is not None, r["id"]))[:CLUSTER_MEMBERS]
                      for k in biggest}
    augmented = [r for r in scores if r["action"] == "augmented"][:TOP_FLAGGED]
    return flagged, shown_clusters, augmented


def fill_missing_thumbnails(out: Path) -> int:
    """Thumbnails the report would show but OUT/report/ lacks (an output written by an older
    memclean, which showed other rows), made as a run makes them (data.read_file, open_image
    in the model's mode) from the source files still at their `path`. Returns how many were
    made; rows whose source is gone (or is a Parquet cell) stay missing, and the page's image
    counter says so."""
    from pipeline.io.data import ImageSpec, Rejected, open_image, read_file

    m = json.loads((out / "manifest.json").read_text())
    score = (m["threshold"] or {}).get("score", "log_volume_growth")  # dedup outputs have none
    decoded = m.get("model") or m["decode"]  # memclean dedup has no model: how it decoded
    spec = ImageSpec(decoded["channels"], tuple(decoded["sample_size"]))
    cols = ["id", "path", "status", "flagged", "dup_cluster", "dup_of", "action", score]
    rows = read_report_rows(out / "scores.parquet", cols)
    folder = out / THUMBS
    folder.mkdir(exist_ok=True)
    made, wanted = 0, ids_to_show(rows, score)
    for r in rows:
        if r["id"] in wanted and not (folder / thumb_name(r["id"])).exists() \
                and r["path"] and os.path.isfile(r["path"]):
            try:
                save_thumbnail(open_image(read_file(r["path"]), spec), folder, r["id"])
                made += 1
            except (Rejected, OSError) as e:
                log.warning("no thumbnail for %s: %s", r["id"], e)
    return made


def write_thumbnails(out: Path, images: dict[str, Image.Image], augmented_png: dict[str, bytes]) -> None:
    """Thumbnails for every image the report shows: `images` maps id -> decoded original."""
    import io

    folder = out / THUMBS
    folder.mkdir(exist_ok=True)
    for id_, img in images.items():
        save_thumbnail(img, folder, id_)
    for id_, png in augmented_png.items():
        save_thumbnail(Image.open(io.BytesIO(png)), folder, "augmented:" + id_)


def write_report_assets(out: Path, source, spec, decided, score: str) -> None:
    """Thumbnails of the images the report shows (originals re-read from `source` in one pass,
    as data.read_verified reads them; augmented variants from their PNGs). The decisions are
    written by then: an input that changed since is only left without a thumbnail."""
    from pipeline.io.data import Rejected, open_image, read_verified

    cols = ["id", "sha256", "status", "flagged", "dup_cluster", "dup_of", "action", "augmented_png", score]
    rows = report_rows(decided.select(cols))
    wanted = ids_to_show(rows, score)
    changed: set[str] = set()
    images = {}
    for item, data in read_verified(source, {r["id"]: r["sha256"] for r in rows if r["id"] in wanted}, changed):
        try:
            images[item.id] = open_image(data, spec)
        except Rejected as e:
            log.warning("no thumbnail for %s: %s", item.id, e)
    if changed:
        log.warning("%d shown images changed after the decisions were written: no thumbnail for them", len(changed))
    augmented = {r["id"]: Path(r["augmented_png"]).read_bytes() for r in rows
                 if r["id"] in wanted and r["action"] == "augmented" and r["augmented_png"]}
    write_thumbnails(out, images, augmented)


def ids_to_show(scores: list[dict[str, Any]], score: str) -> set[str]:
    flagged, clusters, augmented = shown_rows(scores, score)
    return {r["id"] for r in flagged} | {r["id"] for m in clusters.values() for r in m} | {r["id"] for r in augmented}


# ---- HTML --------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4;cursor:pointer}.num{text-align:right}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ccc;border-radius:4px;padding:6px;width:150px;font-size:12px;overflow-wrap:anywhere}
.card img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#eee;display:block}
.row{display:flex;gap:10px;align-items:flex-start;margin-bottom:12px;flex-wrap:wrap}
.keeper{border-color:#2a7;border-width:2px}.dropped{opacity:.75;border-color:#c44}
.pair .card{width:150px}.muted{color:#777}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, i){
  th.addEventListener('click', function(){
    var tb = th.closest('table').tBodies[0], rows = Array.from(tb.rows), asc = th.dataset.asc !== '1';
    rows.sort(function(a, b){
      var x = a.cells[i].dataset.v || a.cells[i].textContent, y = b.cells[i].dataset.v || b.cells[i].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    th.dataset.asc = asc ? '1' : '0'; rows.forEach(function(r){ tb.appendChild(r); });
  });
});
window.addEventListener('load', function(){
  var imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(function(i){ return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.failedResources = window.memcleanFailed.length;
});
"""

# in <head>, before any resource: failed loads (images, anything) are counted for checks
ERROR_JS = """
window.memcleanFailed = [];
window.addEventListener('error', function(e){
  if (e.target && e.target !== window) { window.memcleanFailed.push(e.target.src || e.target.href || '?'); }
}, true);
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def fmt(v: float) -> str:
    """A readable number for axis and labels: fixed point in the usual range, else 3 digits."""
    return f"{v:.1f}" if 0.1 <= abs(v) < 1e6 else f"{v:.3g}"


def histogram_svg(scores: np.ndarray, reference: np.ndarray | None, threshold: float, label: str,
                  width: int = 760, height: int = 260, bins: int = 40, band_low: float | None = None) -> str:
    """Overlaid histograms (dataset, reference) as densities, with the threshold drawn and the
    accept band of augmented replacements [band_low, threshold] shaded."""
    allv = np.concatenate([scores, reference]) if reference is not None and len(reference) else scores
    lo, hi = float(min(allv.min(), threshold)), float(max(allv.max(), threshold))
    if band_low is not None:
        lo = min(lo, band_low)
    if hi == lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    series = [("dataset", scores, "#3465a4")] + ([("held-out reference", reference, "#e07b00")]
                                                   if reference is not None and len(reference) else [])
    dens = [np.histogram(v, edges, density=True)[0] for _, v, _ in series]
    top = max(float(d.max()) for d in dens) or 1.0
    L, R, T, B = 50, 40, 10, 40
    x = lambda v: L + (v - lo) / (hi - lo) * (width - L - R)
    y = lambda d: height - B - d / top * (height - T - B)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="histogram of {esc(label)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>']
    if band_low is not None:
        parts.append(f'<rect x="{x(band_low):.1f}" y="{T}" width="{x(threshold) - x(band_low):.1f}" height="{height - T - B}" '
                     f'fill="#2a7" fill-opacity="0.08" stroke="#2a7" stroke-opacity="0.5" stroke-dasharray="2,2">'
                     f'<title>accept band of augmented replacements</title></rect>'
                     f'<text x="{x(band_low) + 4:.1f}" y="{height - B - 6}" fill="#2a7" font-size="11">accept band</text>')
    for (name, _, color), d in zip(series, dens):
        for k in range(bins):
            parts.append(f'<rect x="{x(edges[k]):.1f}" y="{y(d[k]):.1f}" width="{max(x(edges[k + 1]) - x(edges[k]) - 1, 1):.1f}" '
                         f'height="{height - B - y(d[k]):.1f}" fill="{color}" fill-opacity="0.55"/>')
    tx = x(threshold)
    parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{T}" y2="{height - B}" stroke="#c00" stroke-width="2" stroke-dasharray="5,3"/>')
    anchor, dx = ("end", -4) if tx > 0.7 * width else ("start", 4)
    parts.append(f'<text x="{tx + dx:.1f}" y="{T + 12}" fill="#c00" font-size="12" text-anchor="{anchor}">'
                 f'threshold {fmt(threshold)}</text>')
    parts.append(f'<line x1="{L}" x2="{width - R}" y1="{height - B}" y2="{height - B}" stroke="#444"/>')
    for v in np.linspace(lo, hi, 6):
        parts.append(f'<text x="{x(v):.1f}" y="{height - B + 15}" font-size="11" text-anchor="middle">{fmt(v)}</text>')
    parts.append(f'<text x="{(L + width - R) / 2}" y="{height - 5}" font-size="12" text-anchor="middle">{esc(label)}</text>')
    for k, (name, _, color) in enumerate(series):
        parts.append(f'<rect x="{L + 10}" y="{T + 8 + 16 * k}" width="10" height="10" fill="{color}" fill-opacity="0.55"/>'
                     f'<text x="{L + 25}" y="{T + 17 + 16 * k}" font-size="12">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


SCATTER_POINTS = 5000  # unflagged points drawn at most (a deterministic sample); flagged ones all


def scatter_svg(complexity: np.ndarray, score: np.ndarray, flagged: np.ndarray, threshold: float, label: str,
                width: int = 760, height: int = 300) -> str:
    """The judged score against complexity, flagged points red, the threshold a dashed line: a
    glance tells whether the flags are only the plainest images. complexity, score [n]; flagged [n] bool."""
    keep = np.isfinite(complexity) & np.isfinite(score)
    c, v, f = complexity[keep], score[keep], flagged[keep].astype(bool)
    if not len(c):
        return "<p class='muted'>No complexity recorded for these scores.</p>"
    plain = np.flatnonzero(~f)
    if len(plain) > SCATTER_POINTS:
        plain = np.sort(np.random.default_rng(0).choice(plain, SCATTER_POINTS, replace=False))
    x0, x1 = float(c.min()), float(c.max()) or 1.0
    y0, y1 = float(min(v.min(), threshold)), float(max(v.max(), threshold))
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
    L, R, T, B = 60, 20, 10, 40
    x = lambda u: L + (u - x0) / (x1 - x0) * (width - L - R)
    y = lambda u: height - B - (u - y0) / (y1 - y0) * (height - T - B)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(label)} against complexity" id="scatter">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>']
    for rows, color, r in ((plain, "#3465a4", 1.6), (np.flatnonzero(f), "#c00", 2.2)):
        parts += [f'<circle cx="{x(c[i]):.1f}" cy="{y(v[i]):.1f}" r="{r}" fill="{color}" fill-opacity="0.5"/>'
                  for i in rows]
    ty = y(threshold)
    parts.append(f'<line x1="{L}" x2="{width - R}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#c00" stroke-dasharray="5,3"/>'
                 f'<text x="{width - R - 4}" y="{ty - 4:.1f}" fill="#c00" font-size="12" text-anchor="end">'
                 f'threshold {fmt(threshold)}</text>')
    for u in np.linspace(x0, x1, 6):
        parts.append(f'<text x="{x(u):.1f}" y="{height - B + 15}" font-size="11" text-anchor="middle">{fmt(u)}</text>')
    for u in np.linspace(y0, y1, 5):
        parts.append(f'<text x="{L - 4}" y="{y(u) + 4:.1f}" font-size="11" text-anchor="end">{fmt(u)}</text>')
    parts.append(f'<text x="{(L + width - R) / 2}" y="{height - 5}" font-size="12" text-anchor="middle">'
                 f'complexity (lossless code length, nats)</text>'
                 f'<text transform="translate(12,{(T + height - B) / 2}) rotate(-90)" font-size="12" '
                 f'text-anchor="middle">{esc(label)}</text></svg>')
    return "".join(parts)


def plainest_share(complexity: np.ndarray, flagged: np.ndarray) -> float | None:
    """The share of flagged images in the plainest quartile of complexity (None: none flagged)."""
    keep = np.isfinite(complexity)
    f = flagged[keep].astype(bool)
    if not f.any():
        return None
    return float(np.mean(complexity[keep][f] <= np.quantile(complexity[keep], 0.25)))


def card(r: dict[str, Any], score: str | None, key: str, extra: str = "", cls: str = "") -> str:
    value = f"<div>{esc(score)}: {r[score]:.4g}</div>" if score and r.get(score) is not None else ""
    return (f'<div class="card {cls}"><img src="{THUMBS}/{thumb_name(key)}" alt="{esc(r["id"])}">'
            f'<div><b>{esc(r["id"])}</b></div>{value}{extra}</div>')


def table(rows: Iterable[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                cells.append(f'<td class="num" data-v="{v!r}">{v:.4g}</td>')
            else:
                cells.append(f"<td>{esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _bound(v: float | None, open_end: str) -> str:
    """An interval end: the number, or the open end where the reference cannot bound it."""
    return open_end if v is None else f"{v:.6g}"


def write_report(out: str | os.PathLike) -> Path:
    """Build OUT/report.html from the outputs of a clean run."""
    out = Path(out)
    m = json.loads((out / "manifest.json").read_text())
    score = (m["threshold"] or {}).get("score", "log_volume_growth")  # dedup outputs have none
    scores, ok = scan_scores(out / "scores.parquet", REPORT_COLUMNS + [score], score)
    ref_path = out / "reference_scores.parquet"
    reference = read_ok_scores(ref_path, score) if ref_path.exists() else None
    flagged, clusters, augmented = shown_rows(scores, score)
    c = m["counts"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>memclean report</title>"
             f"<style>{CSS}</style><script>{ERROR_JS}</script></head><body>",
             f"<h1>memclean {'dedup ' if m.get('kind') == 'dedup' else ''}report</h1>"
             f"<p class='muted'>{esc(m['data']['path'])} &rarr; {esc(m['out'])}</p>",
             "<h2>Counts</h2>", table([c], list(c))]
    if m.get("kind") == "dedup":  # memclean dedup: no scores, flags or augmentations
        parts += duplicate_sections(scores, clusters, m, None)
    else:
        plot = complexity_section(read_ok_columns(out / "scores.parquet", [score, "complexity", "flagged"]),
                                  score, m["threshold"]["value"])
        parts += score_sections(scores, ok, reference, flagged, augmented, m, plot)
        parts += duplicate_sections(scores, clusters, m, score)
    parts.append("<h2>Model and settings</h2>")
    parts.append(f"<pre>{esc(json.dumps({'model': m['model'], 'settings': m['settings'], 'dedup': m['dedup'], 'versions': m['versions']}, indent=2))}</pre>")
    parts.append(f"<script>{SORT_JS}</script></body></html>")
    return write_atomic(out / "report.html", "\n".join(parts))


def score_sections(scores: list[dict[str, Any]], ok: np.ndarray, reference: np.ndarray | None,
                   flagged: list[dict], augmented: list[dict], m: dict[str, Any], plot: list[str] = ()) -> list[str]:
    """The histogram, threshold, `plot` (the score against complexity), top flagged gallery and
    augmented replacements."""
    c, t = m["counts"], m["threshold"]
    score = t["score"]
    parts = ["<h2>Scores</h2>", histogram_svg(ok, reference, t["value"], score,
                                              band_low=t.get("details", {}).get("accept_band", [None])[0]),
             f"<p>Threshold <b>{t['value']:.6g}</b> ({esc(t['policy'])}, {esc(json.dumps(t['parameters']))})"
             + (f", 95% CI [{_bound(t['details']['ci'][0], '-inf')}, {_bound(t['details']['ci'][1], '+inf')}] "
                f"from {t['details']['n_reference']} reference images" if "ci" in t.get("details", {}) else "")
             + f"; realised flag rate {t['realised_flag_rate']:.3f}."
             + (f" Augmented replacements are accepted between {_bound(t['details']['accept_band'][0], '-inf')} "
                f"and the threshold (the {t['details']['accept_band_quantile']:g} quantile of the "
                f"{esc(t['details']['accept_band_of'])}'s scores)." if "accept_band" in t.get("details", {}) else "")
             + "</p>", *plot,
             f"<h2>Top flagged images ({len(flagged)} cards for {c['flagged']} flagged images, highest "
             f"{esc(score)} first; a duplicate cluster shows once)</h2>",
             "<div class='gallery' id='flagged'>"]
    in_cluster = Counter(r["dup_cluster"] for r in scores if r["flagged"] and r["dup_cluster"] is not None)
    for r in flagged:
        why = r["action_reason"] or r["flag_reason"]
        more = in_cluster.get(r["dup_cluster"], 1) - 1 if r["dup_cluster"] is not None else 0
        copies = f"<div><b>+{more} flagged copies</b> (cluster {r['dup_cluster']})</div>" if more else ""
        parts.append(card(r, score, r["id"], f"<div>action: <b>{esc(r['action'])}</b></div>{copies}"
                                             f"<div class='muted'>{esc(why)}</div>"))
    parts.append("</div>")
    parts.append(f"<h2>Augmented replacements ({len(augmented)} of {c['augmented']})</h2>")
    for r in augmented:
        parts.append("<div class='row pair'>" + card(r, score, r["id"], "<div>original</div>")
                     + f'<div class="card"><img src="{THUMBS}/{thumb_name("augmented:" + r["id"])}" alt="augmented {esc(r["id"])}">'
                     f"<div><b>{esc(r['augment_preset'])} augmentation</b></div><div>{esc(score)}: {r['augmented_score']:.4g}</div>"
                     f"<div class='muted'>{esc(r['action_reason'])}</div></div></div>")
    return parts


def complexity_section(cols: dict[str, np.ndarray], score: str, threshold: float) -> list[str]:
    """The judged score against complexity, and the flagged images' share of the plainest quartile."""
    if "complexity" not in cols or score not in cols:
        return []
    share = plainest_share(cols["complexity"], cols["flagged"] == 1)
    words = ("no image is flagged" if share is None else
             f"<b>{share:.0%}</b> of the flagged images are in the plainest quartile of complexity "
             "(25% if flagging ignored simplicity)")
    return ["<h2>Score against complexity</h2>",
            scatter_svg(cols["complexity"], cols[score], cols["flagged"] == 1, threshold, score),
            f"<p>{esc(score)} against each image's lossless code length: flagged images red; {words}.</p>"]


def threshold_note(dedup: dict[str, Any]) -> str:
    """How the duplicate threshold was set, and a contaminated reference, in a sentence or two."""
    chosen = dedup.get("threshold_chosen") or {}
    if dedup.get("threshold") is None:  # an output from before thresholds were recorded
        return ""
    text = f"Pairs at or above similarity {fmt(dedup['threshold'])} are duplicates"
    if chosen.get("mode") == "auto" and chosen.get("fitted") is not None:
        what = "the held-out reference against the dataset" if chosen["source"] == "reference" else \
            "the dataset's own nearest neighbours"
        text += (f": above what unrelated images reach by chance ({what}: {chosen['sample']} draws, median "
                 f"{fmt(chosen['quantiles'].get('0.5'))}, largest {fmt(chosen['quantiles'].get('1'))}) at a false-join "
                 f"rate of {chosen['rate']:g}, fitted {fmt(chosen['fitted'])}, floor {fmt(chosen['floor'])}.")
    elif chosen.get("mode") == "auto":
        text += f" ({esc(chosen.get('note') or 'auto')})."
    else:
        text += " (given)."
    if chosen.get("contaminated_reference"):
        shown = ", ".join(f"{esc(d['reference'])} ~ {esc(d['training'])}" for d in chosen["contaminated_examples"][:5])
        text += (f" <b>The reference is contaminated: {chosen['contaminated_reference']} held-out images duplicate a "
                 f"training image</b> ({shown}); they are left out of this threshold, and a model trained on the "
                 "dataset has seen them.")
    return f"<p>{text}</p>"


def duplicate_sections(scores: list[dict[str, Any]], clusters: dict[int, list[dict]], m: dict[str, Any],
                       score: str | None) -> list[str]:
    """The largest duplicate clusters (keeper first) and the table of flagged and duplicated rows."""
    parts = [f"<h2>Duplicate clusters ({len(clusters)} largest of {m['dedup']['clusters']}; keeper first)</h2>",
             threshold_note(m["dedup"])]
    for k, members in clusters.items():
        parts.append(f"<div class='row cluster' data-cluster='{k}'>")
        for r in members:
            keeper = r["dup_of"] is None
            parts.append(card(r, score, r["id"], f"<div>{'keeper' if keeper else 'dropped copy'}"
                              f" (similarity {r['dup_similarity'] or 0:.3f})</div>", "keeper" if keeper else "dropped"))
        parts.append("</div>")
    if score is None:
        parts.append("<h2>Duplicated rows</h2>")
        listed = [r for r in scores if r["dup_cluster"] is not None or r["dup_of"] is not None]
        parts.append(table(listed[:TABLE_ROWS], ["id", "dup_cluster", "dup_of", "dup_similarity", "action",
                                                 "action_reason"]))
    else:
        parts.append("<h2>Flagged and duplicated rows</h2>")
        listed = sorted((r for r in scores if r["flagged"] or r["dup_cluster"] is not None),
                        key=lambda r: (-(r[score] if r[score] is not None else -np.inf), r["id"]))
        parts.append(table(listed[:TABLE_ROWS], ["id", score, "flagged", "dup_cluster", "dup_of", "action",
                                                 "action_reason"]))
    if len(listed) > TABLE_ROWS:
        parts.append(f"<p class='muted'>The first {TABLE_ROWS:,} of {len(listed):,} rows"
                     f"{', highest score first' if score else ''}; scores.parquet holds them all.</p>")
    return parts
