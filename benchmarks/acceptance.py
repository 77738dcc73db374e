"""Remediation at the defaults: how many flagged images get an accepted variant, by preset, and
what a run keeps, on the demo digits, on a second digits set with its own model, and on the photo
evidence set.

    .venv/bin/python benchmarks/acceptance.py [--sets digits digits2 photos] [--no-write]

Each set is cleaned by `memclean clean` with every option at its default (its held-out images as
the reference, the model of the set); the table is read back from scores.parquet and
manifest.json: flagged survivors of dedup sent to augmentation, accepted by the preset of their
last try, why the rest failed (their last variant above the threshold, or below the accept
band), the duplicate clusters whose flagged keeper found no variant (kept once, by the default
--cluster-on-failure keep), and the share of pictures the run removes (the guard's count).
Issue 25's checks, against the planted groups: the duplicate clusters' pairwise precision and
recall, and the images dropped against the bound "the planted copies (each group's images but
one) plus the flagged unique images".

`digits2` is issue 25's second digits set (benchmarks/dup_threshold.py's digits_second: other
scikit-learn digits, 10 copied 30 times, 30 near copies, 200 held out) and a model trained on it
by `memclean train` with the demo model's recipe; both are made once under --cache (the training
takes about ten minutes on 2 cores). Writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.dup_threshold import digits_second, load_digits, planted_truth  # noqa: E402
from benchmarks.near_duplicates import pair_stats  # noqa: E402
from benchmarks.results import hardware, publish  # noqa: E402

SETS = {"digits": (REPO / "examples/digits", REPO / "examples/model"),  # (data folder, model): the evidence sets
        "digits2": (None, None),  # made under --cache by second_digits
        "photos": (REPO / "examples/photos", REPO / "examples/photo-model")}  # every benchmark reads them here
MEMCLEAN = str(REPO / ".venv/bin/memclean")


def second_digits(cache: Path, wheels: Path) -> tuple[Path, Path, dict[str, int], float | None]:
    """Issue 25's second digits set and its own model (the demo model's recipe), made once in `cache`."""
    root, model = cache / "digits2", cache / "digits2-model"
    truth_file = cache / "digits2-truth.json"
    if not truth_file.exists():
        shutil.rmtree(root, ignore_errors=True)  # a set left by an interrupted run
        truth_file.parent.mkdir(parents=True, exist_ok=True)
        truth_file.write_text(json.dumps(digits_second(root, load_digits(wheels))))
    truth = json.loads(truth_file.read_text())
    if not (root / "planted.csv").exists():  # the evidence sets' listing, for benchmarks/scores.py
        write_planted(root / "planted.csv", truth, exact=range(10))
    seconds = None
    if not (model / "model_index.json").exists():
        recipe = json.loads((REPO / "examples/model/training.json").read_text())["settings"]
        t0 = time.perf_counter()
        subprocess.run([MEMCLEAN, "train", "--data", str(root / "train"), "--out", str(model),
                        "--sample-size", str(recipe["sample_size"]), "--channels", str(recipe["channels"]),
                        "--block-out-channels", *map(str, recipe["block_out_channels"]), "--steps", str(recipe["steps"]),
                        "--batch-size", str(recipe["batch_size"]), "--lr", str(recipe["lr"]), "--seed", str(recipe["seed"])],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
    return root, model, truth, seconds


def set_paths(name: str, cache: Path, wheels: Path) -> tuple[Path, Path]:
    """(data folder with train/ and heldout/, model) of an evidence set; digits2 is made (and
    its model trained) once under `cache`, from scikit-learn or its wheel in `wheels`."""
    if name == "digits2":
        data, model, _, _ = second_digits(cache, wheels)
        return data, model
    return SETS[name]


def write_planted(path: Path, truth: dict[str, int], exact) -> None:
    """planted.csv as examples/make_*.py write it: each planted member's file, group, kind and copies."""
    sizes = Counter(g for g in truth.values() if g != -1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "group", "kind", "copies"])
        for name, g in sorted(truth.items(), key=lambda kv: (kv[1], kv[0])):
            if g != -1:
                w.writerow([f"train/{name}", g, "exact" if g in exact else "near", sizes[g]])


def clean(data: Path, model: Path, out: Path) -> tuple[dict, list[dict], float]:
    t0 = time.perf_counter()
    subprocess.run([MEMCLEAN, "clean", "--data", str(data / "train"), "--reference", str(data / "heldout"),
                    "--model", str(model), "--out", str(out), "--no-cache"], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    rows = pq.read_table(out / "scores.parquet", columns=["id", "flagged", "dup_cluster", "dup_of", "action",
                                                          "action_reason", "augment_preset", "augment_tries"]).to_pylist()
    return json.loads((out / "manifest.json").read_text()), rows, seconds


def against_planted(rows: list[dict], truth: dict[str, int]) -> list[str]:
    """Issue 25's checks: cluster precision / recall of the planted groups, and dropped against the bound."""
    ids = [Path(r["id"]).name for r in rows]
    cluster = np.array([-1 if r["dup_cluster"] is None else r["dup_cluster"] for r in rows])
    p = pair_stats(truth, ids, cluster)
    groups = [truth[i] for i in ids]
    copies = len([g for g in groups if g != -1]) - len({g for g in groups if g != -1})
    flagged_unique = sum(1 for r, g in zip(rows, groups) if g == -1 and r["flagged"])
    unique = groups.count(-1)
    dropped = sum(1 for r in rows if r["action"] == "dropped")
    bound = copies + flagged_unique
    return [f"{p['precision']:.3f} / {p['recall']:.3f}",
            f"{dropped} {'<=' if dropped <= bound else '>'} {bound} ({copies} + {flagged_unique} of {unique})"]


def summarise(name: str, m: dict, rows: list[dict], seconds: float, truth: dict[str, int]) -> list[str]:
    tried = [r for r in rows if r["augment_tries"] is not None]
    by_preset = Counter(r["augment_preset"] for r in tried)
    ok = Counter(r["augment_preset"] for r in tried if r["action"] == "augmented")
    why = Counter("above the threshold" if "above the threshold" in (r["action_reason"] or "") else "below the band"
                  for r in tried if r["action"] != "augmented")
    keepers_failed = [r for r in tried if r["action"] != "augmented" and r["dup_cluster"] is not None]
    vanished = sum(1 for r in rows if r["dup_cluster"] in {k["dup_cluster"] for k in keepers_failed})
    c, lost = m["counts"], m["losses"]
    presets = "; ".join(f"{p} {ok[p]}/{by_preset[p]}" for p in ("light", "medium", "strong") if by_preset[p])
    return [f"| {name} | {c['input']} | {c['flagged']} | {len(tried)} | {sum(ok.values())} "
            f"({sum(ok.values()) / max(len(tried), 1):.0%}) | {presets} | {why['above the threshold']} / "
            f"{why['below the band']} | {len(keepers_failed)} ({vanished} pictures) | {c['kept']} / {c['augmented']} / "
            f"{c['dropped']} | {lost['removed']} ({lost['removed'] / c['scored']:.0%}) | "
            f"{' | '.join(against_planted(rows, truth))} | {seconds:.0f} |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/memclean-bench",
                    help="where the second digits set and its model are made once")
    ap.add_argument("--wheels", type=Path, default=Path.home() / ".cache/memclean-bench/wheels",
                    help="where scikit-learn's wheel is, when sklearn is not installed (for its digits)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    lines = ["| set | inputs | flagged | sent to augmentation | accepted | accepted / tried, by the last try's preset | "
             "failed: above the threshold / below the band | clusters whose keeper failed | kept / augmented / "
             "dropped | pictures removed | clusters: pairwise precision / recall | dropped vs planted copies + "
             "flagged unique | s |", "|---" * 13 + "|"]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            data, model = SETS[name]
            if name == "digits2":
                data, model, truth, trained = second_digits(args.cache, args.wheels)
                recipe = json.loads((model / "training.json").read_text())
                notes.append(f"digits2's model: `{recipe.get('command', 'memclean train').replace(str(Path.home()), '~')}` on its {recipe['images']} "
                             "training digits" + (f" ({trained:.0f} s)" if trained else " (made before this run)"))
            else:
                truth = planted_truth(data)
            m, rows, seconds = clean(data, model, Path(tmp) / name)
            lines += summarise(name, m, rows, seconds, truth)
            print(lines[-1], flush=True)
    text = (f"Hardware: {hardware()}. `memclean clean` at its defaults (score {m['threshold']['score']}, "
            f"--augment-tries {m['settings']['augment_tries']}, --accept-band {m['settings']['accept_band']}, "
            f"--on-failure {m['settings']['on_failure']}), the held-out images as the reference. "
            + " ".join(f"{n}." for n in notes) + "\n\n" + "\n".join(lines))
    publish("acceptance", "Remediation at the defaults: `benchmarks/acceptance.py`", text, write=not args.no_write)


if __name__ == "__main__":
    main()
