"""The default score's cost against V alone (issue 24's bound: no more than 1.5x today's default,
in network passes and in images/s), measured side by side in one process on the evidence sets;
writes RESULTS.md's `cost` section.

    .venv/bin/python benchmarks/cost.py [--sets digits digits2 photos] [--rounds 7] [--no-write]

Per set, the same 128 images (benchmarks/scores.py's first 128: members first) are scored in
batches of 64 by three arms: V alone (ScorerSettings(loss_noises=0): the scorer as it was before
the loss), the loss alone, and V and the loss (the default, as a clean run computes them). One
round times each arm once; the arms' order turns over from round to round (V alone first, then
last), so a machine that slows or speeds up within a round weighs on every arm. The cost ratio
is computed per round (V and the loss over V alone, both timed within that round) and reported as
the median over the rounds with its range: the shared 2-core machine this ran on varies by about
10% from minute to minute, which a best-of-rounds figure for each arm alone (benchmarks/scores.py's)
does not cancel. Network passes per image are counted from the settings: Heun over n steps makes
2n drift evaluations, each a forward and a backward pass (the divergence's vector-Jacobian
product); the loss makes one forward pass per noise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.acceptance import SETS, set_paths  # noqa: E402
from benchmarks.results import hardware, publish  # noqa: E402
from benchmarks.scores import BATCH, images  # noqa: E402
from pipeline.score.models import load_model  # noqa: E402
from pipeline.score.scoring import image_spec, loss_images, score_images  # noqa: E402
from pipeline.score.volume import STAGES, ScorerSettings  # noqa: E402

ARMS = ("V alone", "the loss alone", "V and the loss")


def run_arm(model, x: torch.Tensor, arm: str) -> float:
    """Seconds to score x in batches of BATCH as `arm` does."""
    v_only, default = ScorerSettings(loss_noises=0), ScorerSettings()
    t0 = time.perf_counter()
    for s in range(0, len(x), BATCH):
        xb = x[s:s + BATCH]
        if arm != "the loss alone":
            score_images(model, xb, v_only if arm == "V alone" else default)
        if arm != "V alone":
            loss_images(model, xb, default)
    return time.perf_counter() - t0


def round_orders(rounds: int) -> list[tuple[str, ...]]:
    """The arms' order in each round: forwards, then backwards, turn about."""
    return [ARMS if r % 2 == 0 else ARMS[::-1] for r in range(rounds)]


def summarize(seconds: dict[str, list[float]], n: int) -> dict:
    """Per-round times of each arm -> images/s (median round) and the per-round cost ratios."""
    ratios = np.array(seconds["V and the loss"]) / np.array(seconds["V alone"])
    loss_share = np.array(seconds["the loss alone"]) / np.array(seconds["V alone"])
    return {"images_s": {a: n / float(np.median(s)) for a, s in seconds.items()},
            "ratio_median": float(np.median(ratios)), "ratio_min": float(ratios.min()),
            "ratio_max": float(ratios.max()), "loss_over_v": float(np.median(loss_share)),
            "rounds": len(ratios)}


def passes() -> dict[str, int]:
    """Network passes per image at the defaults (forward + backward each count one)."""
    s = ScorerSettings()
    v = STAGES[s.solver] * s.steps * 2  # drift evaluations, each a forward and a VJP backward
    return {"V alone": v, "the loss alone": s.loss_noises, "V and the loss": v + s.loss_noises}


def measure(name: str, model_dir: Path, data: Path, rounds: int) -> dict:
    model = load_model(model_dir)
    spec = image_spec(model)
    x = torch.cat([images(data / "train", spec)[1], images(data / "heldout", spec)[1]])[:128]
    run_arm(model, x[:BATCH], "V and the loss")  # warm-up: allocator, threads, first-call paths
    seconds: dict[str, list[float]] = {a: [] for a in ARMS}
    for order in round_orders(rounds):
        for arm in order:
            seconds[arm].append(run_arm(model, x, arm))
    return {"set": name, "images": len(x), "dims": int(x[0].numel())} | summarize(seconds, len(x))


def report(results: list[dict], seconds: float) -> str:
    p = passes()
    s = ScorerSettings()
    lines = [f"Regenerate: `.venv/bin/python benchmarks/cost.py` ({seconds:.0f} s; {hardware()}; "
             f"{time.strftime('%Y-%m-%d')}). Defaults: {s.solver} with {s.steps} steps, {s.probes} "
             f"{s.probe_mode} {s.divergence} probe, the loss over {s.loss_noises} noises. Network passes "
             f"per image: V {p['V alone']} ({p['V alone'] // 2} forward + {p['V alone'] // 2} backward), the loss "
             f"{p['the loss alone']} forward, the default {p['V and the loss']} "
             f"({p['V and the loss'] / p['V alone']:.2f}x V's).", "",
             "| set | pixels | rounds | V alone (images/s) | the loss alone (images/s) | V and the loss "
             "(images/s) | time, V and the loss / V alone: median (range) | the loss / V alone |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ips = r["images_s"]
        lines.append(f"| {r['set']} | {r['dims']} | {r['rounds']} | {ips['V alone']:.2f} | "
                     f"{ips['the loss alone']:.2f} | {ips['V and the loss']:.2f} | {r['ratio_median']:.3f}x "
                     f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {r['loss_over_v']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/memclean-bench")
    ap.add_argument("--wheels", type=Path, default=Path.home() / ".cache/memclean-bench/wheels")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    results = []
    for name in args.sets:
        data, model = set_paths(name, args.cache, args.wheels)
        results.append(measure(name, model, data, args.rounds))
        print(results[-1], flush=True)
    publish("cost", "The default score's cost against V alone: `benchmarks/cost.py`",
            report(results, time.time() - t0), write=not args.no_write)


if __name__ == "__main__":
    main()
