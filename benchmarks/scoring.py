"""The scoring benchmark: memclean's scorer against score_sde's reference algorithm, on the same
model and images, in one process; writes its section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/scoring.py                      # the demo model, members vs held-out
    .venv/bin/python benchmarks/scoring.py --model M --members DIR --heldout DIR --name other
    .venv/bin/python benchmarks/scoring.py --speed-only --model random:cifar10 --device cuda

For each configuration (solver x steps x probe mode x probes), on n members and n held-out
images scored in batches of --batch-size: images/s, NFE per image, peak memory above the start
(RSS, or CUDA's peak), the probe noise (sd of V between two seeds / sqrt 2) and the Spearman
correlation between the two seeds, Spearman and mean error of V against the truth, and the
members-vs-held-out ROC AUC (mean over the two seeds).

truth: the mean of --truth-runs fresh-probe Heun runs with 64 steps; on --exact-images images
it is checked against the exact divergence (D backward passes per evaluation) at 32 and 64
steps, whose difference bounds the grid's own error.
reference: score_sde's likelihood algorithm (likelihood.py: scipy RK45 at rtol = atol = 1e-5, one
Rademacher probe held fixed over the solve, drift and divergence in separate network calls,
numpy round trips, one adaptive step shared by the batch), timed on --speed-images images; for
quality, averaged over 4 probes on all 2n images.
The chosen default is the cheapest configuration with run-to-run Spearman >= 0.95, Spearman
against the truth >= 0.95, and AUC no lower than the 4-probe reference's; the table marks it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import integrate
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.results import hardware, write_section  # noqa: E402
from pipeline.io.data import batched, discover  # noqa: E402
from pipeline.tools.evaluate import roc_auc  # noqa: E402
from pipeline.score.models import LoadedModel, load_model  # noqa: E402
from pipeline.score.scoring import image_spec  # noqa: E402
from pipeline.score.volume import STAGES, ScorerSettings, log_volume_growth  # noqa: E402

DEFAULT = ScorerSettings()  # what memclean runs with no options
PEAK_FLOPS = {  # dense peak FLOP/s by precision, from the vendors' data sheets
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}


# ---------------------------------------------------------------- inputs

def random_cifar_unet(folder: Path) -> Path:
    """google/ddpm-cifar10-32's UNet configuration (35.7M parameters), random weights, saved as a
    diffusers pipeline with its linear DDPM schedule."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256), attention_head_dim=None,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def load_images(model: LoadedModel, path: str | None, n: int, seed: int) -> torch.Tensor:
    """n decodable images of `path` at random (seeded), as the scorer sees them; random pixels
    when path is None: [n, C, H, W]."""
    spec = image_spec(model)
    if path is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n, spec.channels, *spec.size), generator=g) / 127.5 - 1
    xs = [d.pixels for b in batched(discover(path), spec, 64) for d in b if d.pixels is not None]
    if len(xs) < n:
        raise SystemExit(f"{path} has {len(xs)} decodable images, fewer than --n {n}")
    idx = np.random.default_rng(seed).choice(len(xs), n, replace=False)
    return torch.stack([xs[i] for i in sorted(idx)])


# ---------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory above the start of the block, in MB: CUDA's allocator peak, or process RSS
    sampled every 5 ms after glibc has handed freed pages back (malloc_trim), so that what an
    earlier run freed does not hide this run's peak."""

    def __init__(self, device: str):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base, self.top, self.stop = self.rss_mb(), 0.0, threading.Event()

        def sample() -> None:
            while not self.stop.wait(0.005):
                self.top = max(self.top, self.rss_mb())
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self.base
            return
        self.stop.set()
        self.thread.join()
        self.peak_mb = max(self.top, self.rss_mb()) - self.base


@dataclass
class Run:
    """V of every image from one scorer call, with its cost."""

    V: np.ndarray  # [n] log volume growth
    nfe: float  # drift evaluations per image
    seconds: float
    peak_mb: float


def score(model: LoadedModel, x: torch.Tensor, settings: ScorerSettings, batch_size: int,
          device: str) -> Run:
    """memclean's scorer on x in batches, as `memclean score` calls it."""
    Vs, nfe = [], []
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for start in range(0, len(x), batch_size):
            r = log_volume_growth(model.score_fn, x[start:start + batch_size].to(device), settings)
            Vs.append(r.log_volume_growth.cpu().numpy())
            nfe.append(r.nfe.numpy())
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return Run(np.concatenate(Vs), float(np.concatenate(nfe).mean()), seconds, mem.peak_mb)


def reference_likelihood(model: LoadedModel, x: torch.Tensor, seed: int, rtol: float = 1e-5,
                         atol: float = 1e-5, eps: float = 1e-5) -> tuple[np.ndarray, int]:
    """score_sde's likelihood algorithm (get_likelihood_fn) for a batch: -> (V [B], nfe).

    The drift f = a x + b score(x, t) in t, one Rademacher probe drawn once, the divergence by
    a second network call with a backward pass, scipy's RK45 on the flattened float64 state.
    """
    schedule, score_fn = model.score_fn.schedule, model.score_fn
    shape, B = x.shape, x.shape[0]
    g = torch.Generator().manual_seed(seed)
    probe = (torch.randint(0, 2, shape, generator=g) * 2 - 1).float().to(x.device)

    def drift_fn(sample: torch.Tensor, t: float) -> torch.Tensor:
        t64 = torch.tensor(t, dtype=torch.float64)
        a, b = schedule.drift_coefficients(t64)
        return float(a) * sample + float(b) * score_fn.score(sample, t64)

    def div_fn(sample: torch.Tensor, t: float) -> torch.Tensor:
        with torch.enable_grad():
            sample.requires_grad_(True)
            grad = torch.autograd.grad(torch.sum(drift_fn(sample, t) * probe), sample)[0]
        sample.requires_grad_(False)
        return torch.sum(grad * probe, dim=tuple(range(1, len(shape))))

    def ode_func(t: float, y: np.ndarray) -> np.ndarray:
        sample = torch.from_numpy(y[:-B].reshape(shape)).float().to(x.device)
        with torch.no_grad():
            drift = drift_fn(sample, t).cpu().numpy().reshape(-1)
        logp_grad = div_fn(sample, t).detach().cpu().numpy().reshape(-1)
        return np.concatenate([drift, logp_grad]).astype(np.float64)

    init = np.concatenate([x.cpu().numpy().reshape(-1), np.zeros(B)]).astype(np.float64)
    sol = integrate.solve_ivp(ode_func, (eps, 1.0), init, rtol=rtol, atol=atol, method="RK45")
    return sol.y[-B:, -1], int(sol.nfev)


def reference(model: LoadedModel, x: torch.Tensor, seeds: list[int], device: str) -> list[Run]:
    """The reference on the whole of x, once per probe seed."""
    runs = []
    for seed in seeds:
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            V, nfe = reference_likelihood(model, x.to(device), seed)
            seconds = time.perf_counter() - t0
        runs.append(Run(V, float(nfe), seconds, mem.peak_mb))
    return runs


# ---------------------------------------------------------------- configurations

def configs(quick: bool) -> list[ScorerSettings]:
    """The grid that the benchmark measures (fresh probes unless a row says fixed)."""
    heun = [4, 6, 8, 12, 24] if quick else [4, 5, 6, 8, 10, 12, 16, 24, 32]
    out = [ScorerSettings(solver="heun", steps=s) for s in heun]
    out += [ScorerSettings(solver="euler", steps=s) for s in ([12, 24] if quick else [8, 12, 16, 32])]
    out += [ScorerSettings(solver="rk4", steps=s) for s in ([3, 6] if quick else [2, 3, 4, 6, 8])]
    out += [ScorerSettings(solver="heun", steps=s, probe_mode="fixed") for s in (8, 24)]
    out += [ScorerSettings(solver="heun", steps=8, probe_mode="fixed", probes=4),
            ScorerSettings(solver="heun", steps=4, probes=2), ScorerSettings(solver="heun", steps=8, probes=2)]
    if not quick:
        out.append(ScorerSettings(solver="heun", steps=24, grid="uniform"))
    if DEFAULT not in out:
        out.append(DEFAULT)
    return out


def label(s: ScorerSettings) -> str:
    if s.adaptive:
        return f"{s.solver} rtol {s.rtol:g}, {s.probes} {s.probe_mode} probe{'s' * (s.probes > 1)}"
    grid = "" if s.grid == "log_snr" else f", {s.grid} grid"
    return f"{s.solver}-{s.steps}, {s.probes} {s.probe_mode} probe{'s' * (s.probes > 1)}{grid}"


def cost(s: ScorerSettings) -> int:
    """Network passes per image (forward + backward per probe and evaluation)."""
    return s.steps * STAGES[s.solver] * s.probes


@dataclass
class Row:
    name: str
    settings: ScorerSettings | None
    images_per_s: float
    nfe: float
    peak_mb: float
    noise: float
    spearman_seeds: float
    spearman_truth: float
    mean_error: float
    auc: float
    seconds_per_image: float


def measure(name: str, settings: ScorerSettings | None, a: Run, b: Run, truth: np.ndarray | None,
            members: int) -> Row:
    """A table row from two runs of one configuration with different probe seeds."""
    V = (a.V + b.V) / 2
    auc = np.mean([roc_auc(r.V[:members], r.V[members:]) for r in (a, b)]) if members else float("nan")
    n = len(a.V)
    return Row(name, settings, 2 * n / (a.seconds + b.seconds), a.nfe, max(a.peak_mb, b.peak_mb),
               float(np.std(a.V - b.V) / np.sqrt(2)), float(spearmanr(a.V, b.V)[0]),
               float(spearmanr(a.V, truth)[0]) if truth is not None else float("nan"),
               float(np.mean(V - truth)) if truth is not None else float("nan"),
               float(auc), (a.seconds + b.seconds) / (2 * n))


def auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley and McNeil's (1982) standard error of an ROC AUC from n_pos and n_neg scores."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    return float(np.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)))


def choose(rows: list[Row], floor: float) -> Row | None:
    """The cheapest row (seconds per image) with both Spearmans >= 0.95 and AUC >= floor."""
    ok = [r for r in rows if r.settings is not None and r.spearman_seeds >= 0.95
          and r.spearman_truth >= 0.95 and r.auc >= floor]
    return min(ok, key=lambda r: r.seconds_per_image) if ok else None


# ---------------------------------------------------------------- truth

def truth_runs(model: LoadedModel, x: torch.Tensor, runs: int, batch_size: int, device: str) -> np.ndarray:
    """V as the mean of `runs` fresh-probe Heun-64 runs: [runs, n]."""
    fine = ScorerSettings(solver="heun", steps=64)
    return np.stack([score(model, x, replace(fine, seed=1000 + r), batch_size, device).V for r in range(runs)])


def exact_check(model: LoadedModel, x: torch.Tensor, fresh: np.ndarray, device: str) -> list[str]:
    # the images are spread over the set (first member ... last held-out): the demo's members
    # begin with planted copies, so the first few are one image
    """Table rows comparing the fresh-probe truth with the exact divergence on the images x:
    Heun-32 and Heun-64 (their difference bounds the grid's error; Richardson's extrapolation
    V64 + (V64 - V32) / 3 removes its leading term) and dopri5 at rtol = atol = 1e-5, which
    shares no grid or weights with the fixed-grid solvers."""
    exact = ScorerSettings(divergence="exact", solver="heun")
    V = {s: score(model, x, replace(exact, steps=s), len(x), device).V for s in (32, 64)}
    V["dopri5"] = score(model, x, replace(exact, solver="dopri5", probe_mode="fixed"), len(x), device).V
    se = fresh.std(0, ddof=1) / np.sqrt(len(fresh))
    return [f"| {i} | {V[32][i]:.2f} | {V[64][i]:.2f} | {V[64][i] + (V[64][i] - V[32][i]) / 3:.2f} "
            f"| {V['dopri5'][i]:.2f} | {fresh.mean(0)[i]:.2f} ± {se[i]:.2f} |" for i in range(len(x))]


# ---------------------------------------------------------------- report

def fmt(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)


def table(rows: list[Row], chosen: Row | None, base: float) -> list[str]:
    head = ["| configuration | images/s | x reference | NFE/image | peak MB | noise sd | Spearman seeds "
            "| Spearman truth | mean error | AUC |", "|" + "---|" * 10]
    for r in rows:
        mark = " **(default)**" if chosen is not None and r is chosen else ""
        head.append(f"| {r.name}{mark} | {fmt(r.images_per_s, '.2f')} | {fmt(r.images_per_s / base, '.1f')} | {r.nfe:.0f} "
                    f"| {fmt(r.peak_mb, '.0f')} | {fmt(r.noise, '.1f')} | {fmt(r.spearman_seeds, '.3f')} "
                    f"| {fmt(r.spearman_truth, '.3f')} | {fmt(r.mean_error, '+.1f')} | {fmt(r.auc, '.3f')} |")
    return head


def flops_per_evaluation(model: LoadedModel, x: torch.Tensor) -> float:
    """FLOPs of one drift evaluation (forward and input-gradient backward) on the batch x."""
    from torch.utils.flop_counter import FlopCounterMode

    y = x.clone().requires_grad_(True)
    t = torch.tensor(0.5, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        out = model.score_fn.score(y, t)
        torch.autograd.grad(out, y, torch.ones_like(out))
    return float(counter.get_total_flops())


def speed_only(args: argparse.Namespace, model: LoadedModel) -> list[str]:
    """Throughput and the share of the device's peak FLOP/s, and each precision's rank agreement
    with fp32 on random images (a model with random weights has no members)."""
    x = load_images(model, None, args.n, 0)
    per_eval = flops_per_evaluation(model, x[:args.batch_size].to(args.device)) / min(args.batch_size, len(x))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    settings = ScorerSettings(solver=DEFAULT.solver, steps=DEFAULT.steps)
    score(model, x[:args.batch_size], settings, args.batch_size, args.device)  # warm-up
    base = None
    lines = ["| precision | images/s | NFE/image | peak MB | achieved TFLOP/s | share of peak | Spearman vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for precision in args.precisions:
        run = score(model, x, replace(settings, precision=precision), args.batch_size, args.device)
        base = run.V if base is None else base
        achieved = per_eval * run.nfe * len(x) / run.seconds
        share = f"{achieved / peak[precision]:.1%}" if peak else "-"
        lines.append(f"| {precision} | {len(x) / run.seconds:.1f} | {run.nfe:.0f} | {run.peak_mb:.0f} "
                     f"| {achieved / 1e12:.2f} | {share} | {spearmanr(base, run.V)[0]:.4f} |")
    return [f"{label(settings)}, batch {args.batch_size}, {len(x)} random images, "
            f"{per_eval / 1e9:.2f} GFLOP per image and evaluation ({name}).", ""] + lines


def quality(args: argparse.Namespace, model: LoadedModel) -> list[str]:
    members = load_images(model, args.members, args.n, 0)
    held = load_images(model, args.heldout, args.n, 1)
    x = torch.cat([members, held])
    n = args.n
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    fresh = truth_runs(model, x, args.truth_runs, args.batch_size, args.device)
    truth = fresh.mean(0)
    log(f"truth: {time.perf_counter() - t0:.0f} s")
    pick = np.linspace(0, len(x) - 1, args.exact_images).round().astype(int) if args.exact_images else []
    exact_lines = exact_check(model, x[pick], fresh[:, pick], args.device) if len(pick) else []
    log(f"exact: {time.perf_counter() - t0:.0f} s")
    half = args.speed_images // 2
    subset = torch.cat([members[:half], held[:half]])
    ref_speed = reference(model, subset, [0], args.device)[0]
    ref_rate = len(subset) / ref_speed.seconds
    ours_speed = score(model, subset, DEFAULT, len(subset), args.device)
    ref_runs = reference(model, x, list(range(4)), args.device) if not args.no_reference_quality else []
    log(f"reference: {time.perf_counter() - t0:.0f} s")
    rows = []
    if ref_runs:
        four, seconds = np.mean([r.V for r in ref_runs], 0), sum(r.seconds for r in ref_runs)
        rows.append(measure("reference (score_sde), 1 fixed probe", None, ref_runs[0], ref_runs[1], truth, n))
        rows.append(Row("reference (score_sde), mean of 4 probes", None, len(x) / seconds,
                        sum(r.nfe for r in ref_runs), max(r.peak_mb for r in ref_runs), float("nan"),
                        float("nan"), float(spearmanr(four, truth)[0]), float(np.mean(four - truth)),
                        roc_auc(four[:n], four[n:]), seconds / len(x)))
    truth_auc = roc_auc(truth[:n], truth[n:])
    rows.append(Row("truth (mean of the fine runs)", None, float("nan"), 128.0 * args.truth_runs, float("nan"),
                    float("nan"), float("nan"), 1.0, 0.0, truth_auc, float("nan")))
    # no loss of AUC: at least the 4-probe reference's when it was measured, else the truth's
    # less two of its standard errors (Hanley and McNeil) for n members and n held-out images
    if ref_runs:
        floor, floor_text = rows[-2].auc, f"the 4-probe reference's ({rows[-2].auc:.3f})"
    else:
        floor = truth_auc - 2 * auc_se(truth_auc, n, n)
        floor_text = f"the truth's less two standard errors ({truth_auc:.3f} - {truth_auc - floor:.3f})"
    for settings in configs(args.quick):
        a = score(model, x, settings, args.batch_size, args.device)
        b = score(model, x, replace(settings, seed=1), args.batch_size, args.device)
        rows.append(measure(label(settings), settings, a, b, truth, n))
        log(f"{rows[-1].name}: {rows[-1].images_per_s:.1f} img/s, Spearman {rows[-1].spearman_seeds:.3f}")
    chosen = choose(rows, floor)
    lines = [f"Model `{args.model}`; {n} members (`{args.members}`) and {n} held-out images (`{args.heldout}`); "
             f"batches of {args.batch_size} on {args.device}; {hardware(args.device)}; "
             f"{time.perf_counter() - t0:.0f} s in all.", "",
             f"Reference speed on {len(subset)} images: {ref_rate:.3f} images/s, {ref_speed.nfe:.0f} evaluations "
             f"shared by the batch; memclean's default on the same {len(subset)} images in one batch: "
             f"{len(subset) / ours_speed.seconds:.2f} images/s ({len(subset) / ours_speed.seconds / ref_rate:.0f}x). "
             "The `x reference` column divides each row's images/s by the reference's.", ""]
    lines += table(rows, chosen, ref_rate)
    lines += ["", f"Truth: the mean of {args.truth_runs} fresh-probe Heun-64 runs (noise sd of that mean: "
              f"{np.median(fresh.std(0, ddof=1)) / np.sqrt(args.truth_runs):.2f}, median over images)."]
    if exact_lines:
        lines += ["", "The truth against the exact divergence (D backward passes per evaluation):", "",
                  "| image | exact, Heun-32 | exact, Heun-64 | Richardson | exact, dopri5 | truth ± its standard error |",
                  "|---|---|---|---|---|---|"]
        lines += exact_lines
    if chosen is not None:
        lines += ["", f"Chosen: {chosen.name}, the cheapest with Spearman >= 0.95 between seeds and against the "
                  f"truth and AUC >= {floor_text}."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="examples/model", help="a checkpoint folder, or random:cifar10")
    ap.add_argument("--members", default="examples/digits/train", help="images the model was trained on")
    ap.add_argument("--heldout", default="examples/digits/heldout", help="images it never saw")
    ap.add_argument("--name", default="demo", help="the RESULTS.md section: scoring-NAME")
    ap.add_argument("--n", type=int, default=150, help="members and held-out images each")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--truth-runs", type=int, default=8)
    ap.add_argument("--exact-images", type=int, default=2)
    ap.add_argument("--speed-images", type=int, default=12)
    ap.add_argument("--no-reference-quality", action="store_true", help="time the reference, skip its 4-probe AUC")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    ap.add_argument("--speed-only", action="store_true", help="throughput and precision only (GPU check)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"])
    ap.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = random_cifar_unet(Path(tmp) / "cifar") if args.model == "random:cifar10" else args.model
        model = load_model(path, device=args.device)
        lines = speed_only(args, model) if args.speed_only else quality(args, model)
    title = f"## Scoring ({args.name}): `benchmarks/scoring.py{' --speed-only' if args.speed_only else ''}`"
    text = "\n".join([title, "", *lines])
    print(text)
    if not args.no_write:
        write_section(f"scoring-{args.name}", text)


if __name__ == "__main__":
    main()
