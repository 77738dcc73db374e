"""`memclean verify`: which training images does the model reproduce? Sample it, find the
training pictures its generations copy, and hold a clean run's flags against them.

A staged run (run/staged.py) into OUT:
    generations.parquet  one row per generation: the image (Hugging Face Image), its seed and
                         index, its nearest training image (L2, pixel space), the distance to it
                         and to the nearest other picture, their ratio, `copy` (the ratio test),
                         and the duplicate embedder's most similar training image, the
                         similarity and `similar` (at or above the chance-judged threshold)
    copied.parquet       one row per training image whose picture a generation copies: how
                         many generations copy it, the closest one, and with --from the clean
                         run's flag, action and scores
    manifest.json        generations, the memorization rate with its 95% interval, copied
                         pictures and images, both tests, the flags against the copies (--from),
                         settings, model, timings
    report.html          each copied training picture beside the generations that copy it
Generations are cached by model fingerprint, sampler and seed (score/sampling.py): a killed run
resumes without sampling again what it had sampled.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.decide.copies import nearest_distinct, picture_groups, ratio_test, wilson_interval
from pipeline.decide.embeddings import make_embedder
from pipeline.decide.flagging import SCORE_CHOICES
from pipeline.decide.index import check_faiss
from pipeline.decide.neighbours import nearest_similarity
from pipeline.io.data import discover
from pipeline.io.manifest import versions
from pipeline.io.copies_report import write_verify_report
from pipeline.io.outputs import EMBEDDINGS, INDEX
from pipeline.io.store import IMAGE, is_complete, ok_mask, with_hf_features, with_metadata, write_json_atomic
from pipeline.run.dedup import decode_to_files
from pipeline.run.lifecycle import judge_threshold, search_duplicates
from pipeline.run.shards import Scored
from pipeline.run.staged import StagedRun
from pipeline.score.models import CPU_BATCH, load_model
from pipeline.score.ready import use_compile
from pipeline.score.sampling import generate
from pipeline.score.scoring import image_spec
from pipeline.tools.evaluate import roc_auc

log = logging.getLogger(__name__)

GENERATIONS_SCHEMA = pa.schema([
    ("generation", pa.int64()),  # index within the run's seed: the same generation whatever --generations
    ("seed", pa.int64()),  # --sample-seed
    ("image", IMAGE),  # the generation, PNG (Hugging Face datasets Image)
    ("nearest_id", pa.string()),  # its nearest training image (L2 in the model's pixel space)
    ("nearest_path", pa.string()),
    ("distance", pa.float64()),  # L2 to it, in the model's data range
    ("other_distance", pa.float64()),  # L2 to the nearest training image of another picture (inf: none)
    ("ratio", pa.float64()),  # distance / other_distance
    ("copy", pa.bool_()),  # ratio < --copy-ratio (Carlini et al. 2023)
    ("similar_id", pa.string()),  # the duplicate embedder's most similar training image
    ("similarity", pa.float64()),
    ("similar", pa.bool_()),  # similarity at or above the chance-judged duplicate threshold
])

ROW_GROUP = 256  # generations per row group of generations.parquet

COPIED_SCHEMA = pa.schema([
    ("id", pa.string()),  # a training image whose picture some generation copies
    ("path", pa.string()),
    ("picture", pa.int64()),  # the picture (exact copies, and with --from a duplicate cluster, share one)
    ("generations", pa.int64()),  # generations that copy the picture
    ("closest_generation", pa.int64()),  # the generation nearest to this image among them
    ("closest_distance", pa.float64()),
    ("flagged", pa.bool_()),  # --from: the clean run's flag (null without --from)
    ("action", pa.string()),  # --from: what the clean run did with it
    ("judged_score", pa.float64()),  # --from: the score that run judged
    ("judged_rank", pa.int64()),  # its rank by that score among the training images (1 = the riskiest)
])


def decode_training(source, spec, batch_size: int, embedder, folder: Path, device,
                    progress: Callable[[int], None] | None = None) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """One pass over the training images: a row per input (identity and status), and for the
    decodable ones their pixels flattened [N, D] and their embeddings (None without an
    embedder), memory-mapped in `folder`."""
    def arrays(x: torch.Tensor) -> dict[str, np.ndarray]:
        out = {"pixels": x.flatten(1).numpy()}
        if embedder is not None:
            out["vectors"] = embedder(x.to(device)).cpu().numpy()
        return out

    rows, out = decode_to_files(source, spec, batch_size, arrays, folder, progress)
    if not out:
        raise ValueError("no training image could be decoded: nothing to compare generations with")
    return rows, out["pixels"], out.get("vectors")


def training_set(data: str, clean_output: str | None) -> tuple[str, str | None, bool]:
    """--data as given, or, when it names a finished clean output (a retrained model checked
    against what it was cleaned from), that run's original training data, with the output as
    --from unless one is given. -> (data, clean output, resolved from a clean output?)"""
    out = Path(data)
    if out.is_dir() and is_complete(out) and (out / "manifest.json").is_file():
        m = json.loads((out / "manifest.json").read_text())
        if m.get("kind", "clean") == "clean":
            log.info("--data %s is a clean output: comparing with its original training data %s", data,
                     m["data"]["path"])
            return m["data"]["path"], clean_output or data, True
        raise ValueError(f"--data {data!r} is a memclean {m.get('kind')} output; give the training images, or a clean "
                         "output (its original training data is used)")
    return data, clean_output, False


def clean_run_rows(clean_output: str, ids: list[str]) -> tuple[dict[str, dict], str | None]:
    """A clean output's scores.parquet rows by id, for the training ids, and the score it judged.
    The output must be complete and hold every decoded training id (the same --data)."""
    out = Path(clean_output)
    if not is_complete(out) or not (out / "scores.parquet").is_file():
        raise ValueError(f"--from {clean_output!r} is not a finished memclean clean output (no _COMPLETE or "
                         "scores.parquet)")
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest.get("kind", "clean") != "clean":
        raise ValueError(f"--from {clean_output!r} is a memclean {manifest.get('kind')} output; verify holds a clean "
                         "run's flags against the copies")
    table = pq.read_table(out / "scores.parquet")
    keep = [c for c in ("id", "status", "pixel_sha256", "dup_cluster", "flagged", "action", *SCORE_CHOICES,
                        "log_volume_growth")
            if c in table.column_names]
    by_id = {r["id"]: r for r in table.select(keep).to_pylist()}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"--from {clean_output!r} has no row for {len(missing)} of the {len(ids)} training images "
                         f"(e.g. {missing[:3]}): was it run on this --data?")
    return by_id, (manifest.get("threshold") or {}).get("score")


def png_cell(image: np.ndarray, data_range: tuple[float, float]) -> dict[str, Any]:
    """[C, H, W] in the data range -> a Hugging Face Image cell (PNG bytes)."""
    from PIL import Image

    lo, hi = data_range
    arr = np.clip(np.round((image - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, "PNG")
    return {"bytes": buf.getvalue(), "path": None}


def id_table(rows: list[dict]) -> pa.Table:
    """Decoded rows as the table duplicate search reads: id, pixel_sha256, status."""
    return pa.Table.from_pylist([{k: r[k] for k in ("id", "pixel_sha256", "status")} for r in rows])


def duplicate_search(settings, embedder, rows: list[dict], vectors: np.ndarray, reference_rows: list[dict] | None,
                     reference: np.ndarray | None, device, scratch: Path):
    """The training images' duplicate clusters (one per ok row, None outside one), found as a
    clean or dedup run finds them (lifecycle.search_duplicates: the same index, chance-judged
    threshold and clustering), with the index and threshold, which the similarity test uses."""
    t = id_table(rows)
    ok = ok_mask(t)
    held = Scored(id_table(reference_rows), reference, None) if reference_rows is not None else None
    cols, index, threshold = search_duplicates(vectors, None, t, ok, np.zeros(len(rows)), embedder, settings.dedup,
                                               device, scratch / "train.faiss", held)
    return [c for c, o in zip(cols["dup_cluster"], ok) if o], index, threshold


def reusable_search(clean_output: str, embedder, dedup, model) -> dict | None:
    """The clean output's duplicate search, where its vectors stand for this run's: its
    embeddings (embeddings.parquet) and index (index.faiss) came from the same embedder (for
    unet, the same model's features; for torchscript, the same input side). -> its manifest's
    dedup section and the false-join rate it ran at, or None (the log says why). Whether its
    threshold serves too is reused_search's to say."""
    out = Path(clean_output)
    if not is_complete(out) or not (out / "manifest.json").is_file():
        return None  # clean_run_rows says what is wrong with it
    m = json.loads((out / "manifest.json").read_text())
    section, ran = m.get("dedup") or {}, m.get("settings") or {}
    why = None
    if not (out / EMBEDDINGS).is_file():
        why = "it holds no embeddings.parquet"
    elif section.get("embedder") != embedder.name:
        why = f"its embedder was {section.get('embedder')!r}, this run's is {embedder.name!r}"
    elif embedder.name == "unet" and (m.get("model") or {}).get("fingerprint") != model.fingerprint:
        why = "its unet embeddings are another model's features"
    elif embedder.name.startswith("torchscript") and ran.get("embed_size") != dedup.embed_size:
        why = f"its --embed-size was {ran.get('embed_size')}, this run's is {dedup.embed_size}"
    if why:
        log.info("--from %s: the training set is embedded again (%s)", clean_output, why)
        return None
    return {"dedup": section, "rate": ran.get("dup_false_join_rate")}


def training_vectors(clean_output: str, embedder, ok_rows: list[dict], clean: dict[str, dict], pixels: np.ndarray,
                     shape: tuple[int, ...], folder: Path, device, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The training images' embeddings, memory-mapped in `folder`: the clean output's
    (embeddings.parquet) for the images it holds unchanged (the same pixel hash, not augmented:
    an augmented row holds its variant's), the rest embedded from their pixels. A sample of the
    reused rows is embedded again and must agree, else every row is embedded.
    -> (vectors [N, d], which rows were reused)"""
    pos = {r["id"]: k for k, r in enumerate(ok_rows)}
    parquet = pq.ParquetFile(Path(clean_output) / EMBEDDINGS)
    d = parquet.schema_arrow.field("embedding").type.list_size
    n = len(ok_rows)
    vectors = np.memmap(folder / "vectors.f32", np.float32, "w+", shape=(max(n, 1), d))[:n]
    reused = np.zeros(n, bool)
    for b in parquet.iter_batches(batch_size=4096, columns=["id", "action", "embedding"]):
        emb = b.column("embedding").flatten().to_numpy().reshape(-1, d)
        for j, (i, action) in enumerate(zip(b.column("id").to_pylist(), b.column("action").to_pylist())):
            k = pos.get(i)
            if k is not None and action != "augmented" and clean[i].get("pixel_sha256") == ok_rows[k]["pixel_sha256"]:
                vectors[k], reused[k] = emb[j], True

    def embed(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.array(pixels[rows])).view(len(rows), *shape)
            return embedder(x.to(device)).cpu().numpy()

    check = np.flatnonzero(reused)[np.linspace(0, reused.sum() - 1, min(8, int(reused.sum()))).astype(int)]
    if len(check):
        again = embed(check)
        # unit vectors from the same pixels by the same embedder: they differ by float32 rounding of
        # the embedder's sums (~1e-7 relative a term, over at most a few thousand terms) under a
        # batch of another size; another embedder, size or decode differs by ~1/sqrt(d) or more
        if again.shape[1] != d or not np.allclose(again, vectors[check], atol=1e-3, rtol=0):
            log.info("--from %s: its embeddings are not what this run's embedder gives; every image is embedded",
                     clean_output)
            reused[:] = False
    todo = np.flatnonzero(~reused)
    for start in range(0, len(todo), batch):
        rows = todo[start:start + batch]
        vectors[rows] = embed(rows)
    vectors.flush()
    return vectors, reused


def clean_index(clean_output: str, ok_rows: list[dict], clean: dict[str, dict], vectors: np.ndarray,
                reused: np.ndarray, embedder):
    """The clean output's index.faiss, memory-mapped, where it indexes these training images in
    this order with the same pixels (its rows: the images that run decoded, before any
    augmentation) and a sample of its rows equals this run's search views; else None. A flat
    index only: an IVF one (over 100,000 images) cannot give its rows back to be checked."""
    from pipeline.decide.index import read_index, search_views

    path = Path(clean_output) / INDEX
    ids = [r["id"] for r in ok_rows]
    if not path.is_file() or [i for i, r in clean.items() if r.get("status") == "ok"] != ids:
        return None
    if any(clean[r["id"]].get("pixel_sha256") != r["pixel_sha256"] for r in ok_rows):
        return None  # an image changed since: its row would be the old image's
    index = read_index(path)
    check = np.flatnonzero(reused)[np.linspace(0, reused.sum() - 1, min(16, int(reused.sum()))).astype(int)]
    if index.ntotal != len(ids) or not len(check):
        return None
    views = search_views(np.asarray(vectors[check]), embedder.search_view)
    try:
        stored = np.stack([index.reconstruct(int(k)) for k in check])
    except RuntimeError:  # an index that cannot give its rows back (IVF) is not trusted
        return None
    # the same vectors through the same view: equal but for float32 rounding of the view's blur
    # (sums of a few hundred terms of unit vectors: ~1e-6) on another machine's BLAS
    return index if stored.shape == views.shape and np.allclose(stored, views, atol=1e-5, rtol=0) else None


def reused_search(clean_output: str, found: dict, settings, embedder, ok_rows: list[dict], clean: dict[str, dict],
                  pixels: np.ndarray, shape: tuple[int, ...], scratch: Path, device, batch: int,
                  reference_rows: list[dict] | None, reference: np.ndarray | None):
    """The similarity test's index, vectors and threshold from the clean output (what it holds
    of them, the rest made here): its threshold where it was judged against chance at this
    run's false-join rate, else judged here as duplicate search judges it (--reference's images,
    else the training set's own neighbours), or --dup-threshold as given.
    -> (index, vectors, threshold, record for the manifest)"""
    from pipeline.decide.chance import ChanceThreshold
    from pipeline.decide.index import build_index, on_device, search_views

    section = found["dedup"]
    vectors, reused = training_vectors(clean_output, embedder, ok_rows, clean, pixels, shape, scratch, device, batch)
    index = clean_index(clean_output, ok_rows, clean, vectors, reused, embedder)
    built = index is None
    index = build_index(vectors, device=device, view=embedder.search_view, path=scratch / "train.faiss") if built \
        else on_device(index, device)
    chosen = section.get("threshold_chosen") or {}
    if settings.dedup.auto and chosen.get("mode") == "auto" and section.get("index") \
            and found["rate"] == settings.dedup.dup_false_join_rate:
        threshold, how = ChanceThreshold.from_dict(chosen), "--from"
    else:  # given here; or the clean run gave its threshold, ran no duplicate search, or judged at another rate
        held = Scored(id_table(reference_rows), reference, None) if reference_rows is not None else None
        threshold = judge_threshold(vectors, id_table(ok_rows), np.ones(len(ok_rows), bool), index,
                                    search_views(vectors, embedder.search_view), embedder, settings.dedup, held)
        how = "this run" if settings.dedup.auto else "given"
    record = {"from": clean_output, "embeddings_reused": int(reused.sum()), "embedded": int((~reused).sum()),
              "index": "built" if built else "reused", "threshold": how}
    return index, vectors, threshold, record


def similarity_test(embedder, gens: np.ndarray, index, vectors: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """Each generation's most similar training image by the duplicate embedder (-1: none) and
    the similarity."""
    with torch.no_grad():  # a chunk at a time: gens may be memory-mapped
        gv = np.concatenate([embedder(torch.from_numpy(np.array(gens[s:s + 256])).to(device)).cpu().numpy()
                             for s in range(0, len(gens), 256)])
    return nearest_similarity(gv.astype(np.float32), None, index, vectors, None, embedder)


def flags_against_copies(copied: np.ndarray, clean: dict[str, dict], ids: list[str], judged: str | None) -> dict:
    """The clean run's flags held against the training images the model copies: recall (the
    share of copied images flagged), the flag rate among the others, the share removed, and each
    score's AUC, copied vs not (higher = riskier)."""
    flagged = np.array([bool(clean[i].get("flagged")) for i in ids])
    removed = np.array([clean[i].get("action") in ("dropped", "augmented") for i in ids])
    out: dict[str, Any] = {"copied_images": int(copied.sum()), "judged": judged,
                           "recall": float(flagged[copied].mean()) if copied.any() else None,
                           "flag_rate_not_copied": float(flagged[~copied].mean()) if (~copied).any() else None,
                           "removed_copied": float(removed[copied].mean()) if copied.any() else None,
                           "auc": {}}
    for name in (*SCORE_CHOICES, "log_volume_growth"):
        v = np.array([clean[i].get(name) if clean[i].get(name) is not None else np.nan for i in ids], float)
        ok = np.isfinite(v)
        if (copied & ok).any() and (~copied & ok).any():
            out["auc"][name] = round(roc_auc(v[copied & ok], v[~copied & ok]), 4)
    return out


def descending_rank(values: np.ndarray) -> np.ndarray:
    """Each value's rank, 1 for the highest (ties share the best rank; NaN stays NaN)."""
    from scipy.stats import rankdata

    out = np.full(len(values), np.nan)
    ok = np.isfinite(values)
    out[ok] = rankdata(-values[ok], method="min")
    return out


def held_out_copies(held: np.ndarray | None, pixels: np.ndarray, groups: np.ndarray, rows: np.ndarray,
                    ratio: float) -> dict[str, Any] | None:
    """The ratio test's false-copy rate on this data: the held-out images (--reference: never
    trained on, so they copy nothing) that pass it against the training set, with the 95%
    interval; one that passes duplicates a training picture. None without held-out images."""
    if held is None:
        return None
    d1, d2, _ = nearest_distinct(held, pixels, groups, rows)
    k, n = int(ratio_test(d1, d2, ratio).sum()), len(held)
    return {"images": n, "passing": k, "rate": k / n if n else None, "interval95": list(wilson_interval(k, n))}


def run_verify(settings, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """memclean verify into settings.output.out; returns the manifest."""
    with StagedRun(settings.output.out, settings.output.overwrite) as run:
        m = settings.model
        model = load_model(m.model, m.allow_pickle, m.device, m.variant, m.data_range)
        spec = image_spec(model, settings.input.max_pixels, settings.input.min_size)
        embedder = make_embedder(settings.dedup.embedder, model, settings.dedup.embed_size, m.device,
                                 image_side=spec.size[0], channels=spec.channels)
        check_faiss()
        data, clean_output, resolved = training_set(settings.input.data, settings.copies.clean_output)
        reuse = reusable_search(clean_output, embedder, settings.dedup, model) if clean_output else None
        source = discover(data, settings.input.image_column)
        source.skipped  # a folder's files that are not images: said now, recorded in the manifest
        scratch = run.staging / "scratch"
        scratch.mkdir()
        batch = m.batch_size or CPU_BATCH  # decoding and embedding (sampling has its own default)
        with run.stage("decode"):
            rows, pixels, vectors = decode_training(source, spec, batch, None if reuse else embedder, scratch,
                                                    m.device, progress)
            ok_rows = [r for r in rows if r["status"] == "ok"]
            ids = [r["id"] for r in ok_rows]
            ref_rows, ref_pixels, reference = None, None, None
            if settings.copies.reference:
                ref_dir = scratch / "reference"
                ref_dir.mkdir()
                ref_rows, ref_pixels, reference = decode_training(
                    discover(settings.copies.reference, settings.input.image_column), spec, batch, embedder, ref_dir,
                    m.device)
        clean, judged = clean_run_rows(clean_output, ids) if clean_output else (None, None)
        with run.stage("generate"):
            gens, sampling = generate(model, settings.sample, m.batch_size, settings.cache.root, progress,
                                      out=scratch / "generations.npy", compile_network=use_compile(m))
        with run.stage("search"):
            hashes = [r["pixel_sha256"] for r in ok_rows]
            if reuse:  # the clean run's clusters are the pictures; its embeddings, index and threshold serve
                index, vectors, threshold, searched = reused_search(clean_output, reuse, settings, embedder, ok_rows,
                                                                    clean, pixels, (spec.channels, *spec.size),
                                                                    scratch, m.device, batch, ref_rows, reference)
                clusters = None
            else:
                clusters, index, threshold = duplicate_search(settings, embedder, rows, vectors, ref_rows, reference,
                                                              m.device, scratch)
                searched = {"from": None, "embeddings_reused": 0, "embedded": len(ok_rows), "index": "built",
                            "threshold": "this run" if settings.dedup.auto else "given"}
            groups = picture_groups(hashes, [clean[i].get("dup_cluster") for i in ids] if clean else clusters)
            distinct = np.sort(np.unique(np.array(hashes, dtype=object), return_index=True)[1])  # one per exact copy
            d1, d2, near = nearest_distinct(gens.reshape(len(gens), -1), pixels, groups, distinct)
            copy = ratio_test(d1, d2, settings.copies.copy_ratio)
            sim_row, sim = similarity_test(embedder, gens, index, vectors, m.device)
            similar = sim >= threshold.value
        with run.stage("write"):
            result = write_outputs(run.staging, settings, model, embedder.name, source, gens, ok_rows, groups, d1, d2,
                                   near, copy, sim_row, sim, similar, threshold, clean, judged, sampling, len(rows))
            result["similar"]["search"] = searched
            result["copies"]["held_out"] = held_out_copies(ref_pixels, pixels, groups, distinct,
                                                           settings.copies.copy_ratio)
            reasons = Counter(r["reject_reason"] for r in rows if r["reject_reason"])
            result["training"].update(rejected=len(rows) - len(ok_rows), reject_reasons=dict(sorted(reasons.items())),
                                      clean_output=clean_output, from_clean_output=resolved)
            write_verify_report(run.staging, result, gens, pixels, ok_rows, groups, near, copy, d1, model.data_range)
        del pixels, vectors
        shutil.rmtree(scratch)
        result.update(run.record())
        write_json_atomic(run.staging / "manifest.json", result)
        run.commit()
        return result


def write_outputs(folder: Path, settings, model, embedder_name: str, source, gens: np.ndarray, ok_rows: list[dict],
                  groups: np.ndarray, d1: np.ndarray, d2: np.ndarray, near: np.ndarray, copy: np.ndarray, sim_row: np.ndarray,
                  sim: np.ndarray, similar: np.ndarray, threshold, clean: dict | None, judged: str | None,
                  sampling: dict, inputs: int) -> dict[str, Any]:
    """generations.parquet and copied.parquet into `folder`; returns the manifest (without timings)."""
    ids = [r["id"] for r in ok_rows]
    seed = settings.sample.sample_seed
    meta = {"settings": settings.flat(), "model": model.record(), "kind": "verify"}
    with_sim = sim_row >= 0
    ratio = np.where(np.isfinite(d2), d1 / np.where(d2 > 0, d2, 1), 0.0)
    schema = with_hf_features(with_metadata(GENERATIONS_SCHEMA, meta))
    with pq.ParquetWriter(folder / "generations.parquet", schema) as writer:
        for s in range(0, len(gens), ROW_GROUP):  # a row group at a time: the images are encoded as they go
            r = slice(s, min(s + ROW_GROUP, len(gens)))
            writer.write_table(pa.Table.from_pydict({
                "generation": np.arange(r.start, r.stop), "seed": [seed] * (r.stop - r.start),
                "image": [png_cell(g, model.data_range) for g in np.asarray(gens[r])],
                "nearest_id": [ids[k] for k in near[r]], "nearest_path": [ok_rows[k]["path"] for k in near[r]],
                "distance": d1[r], "other_distance": d2[r], "ratio": ratio[r], "copy": copy[r],
                "similar_id": [ids[k] if ok else None for k, ok in zip(sim_row[r], with_sim[r])],
                "similarity": np.where(with_sim[r], sim[r], np.nan), "similar": similar[r] & with_sim[r],
            }, schema))
    # the copied pictures: every training image in a picture some generation copies
    copied_pictures = np.unique(groups[near[copy]])
    copied = np.isin(groups, copied_pictures)
    per_picture = np.bincount(groups[near[copy]], minlength=groups.max() + 1)
    judged_values = np.array([clean[i].get(judged) if clean and judged and clean[i].get(judged) is not None
                              else np.nan for i in ids], float)
    rank = descending_rank(judged_values)
    # each copied picture's closest copying generation, found once per picture
    copying = np.flatnonzero(copy)
    copying = copying[np.lexsort((d1[copying], groups[near[copying]]))]  # by picture, closest first
    pictures, first = np.unique(groups[near[copying]], return_index=True)
    closest = dict(zip(pictures.tolist(), copying[first].tolist()))
    rows = []
    for r in np.flatnonzero(copied):
        g = closest[int(groups[r])]
        rows.append({"id": ids[r], "path": ok_rows[r]["path"], "picture": int(groups[r]),
                     "generations": int(per_picture[groups[r]]), "closest_generation": g,
                     "closest_distance": float(d1[g]),
                     "flagged": bool(clean[ids[r]].get("flagged")) if clean else None,
                     "action": clean[ids[r]].get("action") if clean else None,
                     "judged_score": None if np.isnan(judged_values[r]) else float(judged_values[r]),
                     "judged_rank": None if np.isnan(rank[r]) else int(rank[r])})
    pq.write_table(pa.Table.from_pylist(rows, with_metadata(COPIED_SCHEMA, meta)), folder / "copied.parquet")
    n, k = len(gens), int(copy.sum())
    s_k = int((similar & with_sim).sum())
    lo, hi = wilson_interval(k, n)
    s_lo, s_hi = wilson_interval(s_k, n)
    return {
        "kind": "verify",
        "generations": n,
        "copies": {"test": f"ratio < {settings.copies.copy_ratio:g} (L2, pixel space; Carlini et al. 2023)",
                   "generations": k, "rate": k / n, "interval95": [lo, hi],
                   "copied_pictures": len(copied_pictures), "copied_images": int(copied.sum())},
        "similar": {"test": "duplicate embedder similarity at or above the threshold", "embedder": embedder_name,
                    "threshold": threshold.to_dict(),
                    "false_join_rate": settings.dedup.dup_false_join_rate, "generations": s_k,
                    "rate": s_k / n, "interval95": [s_lo, s_hi],
                    "similar_pictures": len(np.unique(groups[sim_row[similar & with_sim]]))},
        "both": int((copy & similar).sum()),
        "flags": flags_against_copies(copied, clean, ids, judged) if clean else None,
        "training": {"input": inputs, "decoded": len(ok_rows), "pictures": int(len(np.unique(groups))),
                     "groups": "exact copies and the duplicate clusters of --from" if clean
                     else "exact copies and this run's duplicate clusters (the threshold above)"},
        "sampling": {**sampling, "sampler": "ddim", "eta": 0.0, "steps": settings.sample.sample_steps,
                     "seed": seed},
        "model": model.record(), "data": source.record(), "settings": settings.flat(), "versions": versions(),
        "out": str(settings.output.out),
    }
