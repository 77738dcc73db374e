"""manifest.json: what a clean run did, in numbers (counts, threshold, duplicates, model,
settings, versions, timings), so that every output can be traced and reproduced.
"""
from __future__ import annotations

import platform
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import __version__
from pipeline.io.store import ok_mask


def versions() -> dict[str, str]:
    """The versions of everything that makes the numbers."""
    import albumentations
    import diffusers
    import faiss
    import torchdiffeq

    return {"memclean": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "torchdiffeq": torchdiffeq.__version__,
            "pyarrow": pa.__version__, "numpy": np.__version__, "faiss": faiss.__version__,
            "albumentations": albumentations.__version__}


def tally(column: pa.ChunkedArray) -> Counter:
    """How often each non-null value occurs, counted by Arrow (no Python object per row)."""
    return Counter({v["values"]: v["counts"] for v in pc.value_counts(column.drop_null()).to_pylist()})


ACTIONS = ("kept", "augmented", "dropped", "rejected")  # the one action every input ends in


def counts(decided: pa.Table) -> dict[str, int]:
    """The manifest counts; input = kept + augmented + dropped + rejected always, or ValueError
    (a row without one of the four actions is a bug the run must not commit)."""
    actions, statuses = tally(decided.column("action")), tally(decided.column("status"))
    flagged = tally(decided.column("flagged"))[True]
    c = {"input": decided.num_rows, "rejected": actions["rejected"], "scored": statuses["ok"],
         "flagged": flagged, **{a: actions[a] for a in ("kept", "augmented", "dropped")}}
    if c["input"] != sum(c[a] for a in ACTIONS):
        other = {a: n for a, n in actions.items() if a not in ACTIONS}
        raise ValueError(f"{c['input'] - sum(c[a] for a in ACTIONS)} inputs have no action of {ACTIONS} "
                         f"(other actions: {other}, null: {decided.column('action').null_count}): {c}")
    return c


def threshold_section(threshold: dict[str, Any], score: str, c: dict[str, int]) -> dict[str, Any]:
    """The threshold (policy, value, interval, accept band) with the flag rate it gave."""
    return {**threshold, "score": score, "realised_flag_rate": c["flagged"] / c["scored"] if c["scored"] else None}


def dedup_section(decided: pa.Table, dedup: dict[str, Any]) -> dict[str, Any]:
    """The duplicate search's settings and index (`dedup`) with the clusters it found."""
    clusters = tally(decided.column("dup_cluster"))
    return {**dedup, "clusters": len(clusters), "in_clusters": sum(clusters.values())}


def reference_section(reference: pa.Table | None, path: str | None) -> dict[str, Any] | None:
    if reference is None:
        return None
    return {"path": path, "input": reference.num_rows, "scored": int(ok_mask(reference).sum())}


def scoring_section(by_source: dict[str, dict[str, Any]], cache_dir: str | None,
                    precision: dict[str, Any] | None = None) -> dict[str, Any]:
    """Images solved afresh and reused over every source and pass; with `precision`, the passes
    run and the judged score's noise ratio after each (run/passes.py)."""
    out = {"scored_fresh": sum(v["fresh"] for v in by_source.values()),
           "reused": sum(v["reused"] for v in by_source.values()), "by_source": by_source, "cache_dir": cache_dir}
    return {**out, "precision": precision} if precision is not None else out


def manifest(decided: pa.Table, *, kind: str, run: dict[str, dict[str, float]], threshold: dict[str, Any] | None,
             score: str, dedup: dict[str, Any], reference: pa.Table | None, reference_path: str | None,
             model: dict[str, Any] | None, data: dict[str, Any], settings: dict[str, Any],
             scoring: dict[str, dict[str, Any]], cache_dir: str | None, out: str,
             image_bytes: dict[str, int] | None = None, precision: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a finished run (every argument is already plain data). kind: clean, or
    dedup (no scores: its counts say what was decoded, and it has no threshold). run: the
    staged run's record (timings_s, peak_rss_mb, held_mb), the same keys for every verb."""
    reasons = {r: n for r, n in tally(decided.column("reject_reason")).items() if r}
    c = counts(decided)
    if kind == "dedup":
        c = {"input": c["input"], "decoded": c["scored"], "kept": c["kept"], "dropped": c["dropped"],
             "rejected": c["rejected"]}
    return {
        "kind": kind,
        "counts": c,
        "reject_reasons": dict(sorted(reasons.items())),
        "threshold": threshold_section(threshold, score, c) if threshold is not None else None,
        "dedup": dedup_section(decided, dedup),
        "reference": reference_section(reference, reference_path),
        "model": model,
        "data": data,
        "settings": settings,
        "versions": versions(),
        **run,  # timings_s, peak_rss_mb, held_mb: seconds, peak RSS and anonymous memory after each stage
        "scoring": scoring_section(scoring, cache_dir, precision),
        "image_bytes": image_bytes or {},  # bytes of images written into cleaned/ and flagged.parquet
        "out": out,
    }


STAGES = "per stage (its name: score, write_cleaned, ...)"  # the keys of the timing and memory sections
# Every key a manifest holds, by the kind of run (clean, dedup, verify), with what it means: the
# source of the documentation's reference page (memclean/reference.py); tests/test_reference.py
# holds real manifests against it. A nested dict documents the keys of a section; a string, a value.
MANIFEST_KEYS: dict[str, dict[str, Any]] = {
    "clean": {
        "kind": "clean",
        "counts": {"input": "inputs read", "rejected": "inputs that could not be used (reasons in reject_reasons)",
                   "scored": "inputs scored", "flagged": "scored inputs flagged",
                   "kept": "kept as they were", "augmented": "replaced by an accepted augmentation",
                   "dropped": "removed (input = kept + augmented + dropped + rejected)"},
        "reject_reasons": "{reason: inputs rejected for it}",
        "threshold": {"policy": "the flagging policy (reference_fpr, quantile, robust_zscore, absolute)",
                      "value": "the threshold: flagged when the judged score is strictly above it",
                      "parameters": "the policy's parameters",
                      "details": "the confidence interval (null ends the reference cannot bound), the accept band, "
                                 "the complexity calibration, --flag-copied's counts",
                      "score": "the score judged (--score)", "realised_flag_rate": "flagged / scored"},
        "dedup": {"embedder": "the duplicate embedder's name (pixel, pixel+colour, unet, torchscript:...)",
                  "threshold": "the similarity at or above which two images are duplicates",
                  "threshold_chosen": "how it was chosen: auto (chance: source, rate, fitted law, draws) or given",
                  "threshold_meaning": "what the similarity measures", "flip": "--dedup-flip",
                  "against": "--against as given", "against_outputs": "the earlier outputs it resolved to",
                  "index": "the FAISS index class", "index_on_gpu": "whether the search ran on a GPU",
                  "clusters": "duplicate clusters", "in_clusters": "images in them"},
        "reference": {"path": "--reference", "input": "held-out inputs", "scored": "held-out images scored"},
        "model": {"path": "the checkpoint's folder", "hub": "Hub id, revision, commit and snapshot (a Hub id given)",
                  "fingerprint": "sha256 of the loaded weights and configs", "layout": "flat, pipeline, ...",
                  "variant": "--variant", "data_range": "the range the model sees images in",
                  "bits_per_dim_offset": "bits/dim's dequantization offset", "score_space": "pixel or latent",
                  "latent_shape": "the latent's C, H, W (latent pipelines)", "autoencoder": "its class",
                  "scheduler": "the scheduler's class", "channels": "image channels", "sample_size": "image H, W"},
        "data": {"path": "--data", "kind": "folder, image, parquet, arrow, list, webdataset, ...",
                 "skipped_files": "a folder's files not read as images, by extension"},
        "settings": "every setting by its option name, resolved (defaults filled in)",
        "versions": "the versions of every package that makes the numbers",
        "timings_s": f"seconds {STAGES}", "peak_rss_mb": f"the process's peak RSS after each stage, {STAGES}",
        "held_mb": f"anonymous memory held after each stage, {STAGES}",
        "scoring": {"scored_fresh": "images solved afresh (every source and pass)", "reused": "cached scores reused",
                    "by_source": "per source and pass: fresh, reused, seconds, images_per_s",
                    "cache_dir": "the score cache", "precision": "the passes, the judged score's noise ratio after "
                                                                  "each, the score and the target"},
        "image_bytes": {"cleaned": "bytes of images in cleaned/", "flagged": "bytes of images in flagged.parquet"},
        "losses": "the pictures the decisions remove, by reason",
        "refused": "null, or why the guard refused the run (--max-loss-fraction)",
        "out": "the output folder",
    },
    "verify": {
        "kind": "verify",
        "generations": "generations sampled (--generations)",
        "copies": {"test": "the ratio test applied", "generations": "generations that copy a training picture",
                   "rate": "their share", "interval95": "its 95% Wilson interval",
                   "copied_pictures": "training pictures copied (copies of one picture count once)",
                   "copied_images": "training images in them",
                   "held_out": "with --reference (else null): the test's false-copy rate on this data, the held-out "
                               "images that pass it against the training set: images, passing, rate, interval95"},
        "similar": {"test": "the similarity test", "embedder": "the duplicate embedder",
                    "threshold": "its threshold as chosen (auto: judged against chance)",
                    "false_join_rate": "the chance, for a generation that copies nothing, of reaching an auto "
                                       "threshold (--dup-false-join-rate)",
                    "generations": "generations at or above it", "rate": "their share",
                    "interval95": "its 95% Wilson interval", "similar_pictures": "pictures they are similar to",
                    "search": "what the test searched with: from (the clean output --from, when its embeddings "
                              "serve), embeddings_reused (its embeddings of images it holds unchanged), embedded "
                              "(embedded by this run), index (reused: its index.faiss; built) and threshold (--from: "
                              "its threshold; this run: judged here; given: --dup-threshold)"},
        "both": "generations that pass both tests",
        "flags": "with --from (else null): recall (copied images flagged), flag_rate_not_copied, removed_copied, "
                 "copied_images, judged (the score the clean run judged) and auc (each score, copied vs not)",
        "training": {"input": "training inputs read", "decoded": "decoded (the rest rejected)",
                     "rejected": "inputs that could not be decoded", "reject_reasons": "{reason: inputs}",
                     "pictures": "distinct pictures", "groups": "how pictures were grouped",
                     "clean_output": "the clean output held against the copies (--from, or --data's)",
                     "from_clean_output": "whether --data named a clean output (its original data was used)"},
        "sampling": {"sampler": "ddim", "eta": "0", "steps": "--sample-steps", "seed": "--sample-seed",
                     "key": "the generation cache's key (model fingerprint, sampler, steps, seed)",
                     "cache": "the generation cache's folder (null: --no-cache)",
                     "cached": "generations read back from the cache", "fresh": "generations sampled by this run",
                     "network_passes": "forward passes this run spent sampling", "seconds": "seconds sampling",
                     "batch_size": "generations through the network at once",
                     "precision": "the network's arithmetic (--precision resolved for the device)",
                     "compiled": "whether the network ran through torch.compile (--compile)"},
        "model": "as a clean run's", "data": "as a clean run's", "settings": "as a clean run's",
        "versions": "as a clean run's", "timings_s": f"seconds {STAGES}",
        "peak_rss_mb": f"peak RSS {STAGES}", "held_mb": f"memory held {STAGES}", "out": "the output folder",
    },
}
# memclean dedup's manifest: a clean run's keys, with decode-only counts and no threshold or scoring
MANIFEST_KEYS["dedup"] = {
    **{k: v for k, v in MANIFEST_KEYS["clean"].items() if k not in ("counts",)},
    "kind": "dedup",
    "counts": {"input": "inputs read", "decoded": "inputs decoded and embedded", "kept": "kept",
               "dropped": "dropped as duplicates", "rejected": "inputs that could not be decoded"},
    "threshold": "null: nothing is flagged", "reference": "null", "model": "null", "scoring": "{}",
    "decode": {"channels": "channels images were decoded to", "sample_size": "the size they were decoded at"},
    "image_bytes": {"cleaned": "bytes of images in cleaned/"},
}
