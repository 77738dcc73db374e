"""Remediation at the defaults: how many flagged images get an accepted variant, by preset, and
what a run keeps, on the demo digits and on the photo evidence set.

    .venv/bin/python benchmarks/acceptance.py [--sets digits photos] [--no-write]

Each set is cleaned by `memclean clean` with every option at its default (its held-out images as
the reference, the bundled model of the set); the table is read back from scores.parquet and
manifest.json: flagged survivors of dedup sent to augmentation, accepted by the preset of their
last try, why the rest failed (their last variant above the threshold, or below the accept
band), the duplicate clusters whose flagged keeper found no variant (kept once, by the default
--cluster-on-failure keep), and the share of pictures the run removes (the guard's count). Writes its section of
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.results import hardware, publish  # noqa: E402

SETS = {"digits": ("examples/digits", "examples/model"), "photos": ("examples/photos", "examples/photo-model")}


def clean(name: str, out: Path) -> tuple[dict, list[dict], float]:
    data, model = SETS[name]
    t0 = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/memclean"), "clean", "--data", str(REPO / data / "train"), "--reference",
                    str(REPO / data / "heldout"), "--model", str(REPO / model), "--out", str(out), "--no-cache"],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    rows = pq.read_table(out / "scores.parquet", columns=["id", "flagged", "dup_cluster", "dup_of", "action",
                                                          "action_reason", "augment_preset", "augment_tries"]).to_pylist()
    return json.loads((out / "manifest.json").read_text()), rows, seconds


def summarise(name: str, m: dict, rows: list[dict], seconds: float) -> list[str]:
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
            f"{c['dropped']} | {lost['removed']} ({lost['removed'] / c['scored']:.0%}) | {seconds:.0f} |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    lines = ["| set | inputs | flagged | sent to augmentation | accepted | accepted / tried, by the last try's preset | "
             "failed: above the threshold / below the band | clusters whose keeper failed | kept / augmented / "
             "dropped | pictures removed | s |", "|---" * 11 + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            m, rows, seconds = clean(name, Path(tmp) / name)
            lines += summarise(name, m, rows, seconds)
            print(lines[-1], flush=True)
    text = (f"Hardware: {hardware()}. `memclean clean` at its defaults (score {m['threshold']['score']}, "
            f"--augment-tries {m['settings']['augment_tries']}, --accept-band {m['settings']['accept_band']}, "
            f"--on-failure {m['settings']['on_failure']}), the held-out images as the reference.\n\n" + "\n".join(lines))
    publish("acceptance", "Remediation at the defaults: `benchmarks/acceptance.py`", text, write=not args.no_write)


if __name__ == "__main__":
    main()
