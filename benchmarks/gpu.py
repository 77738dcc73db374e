"""The GPU benchmark (issue 38), in one short run: how fast memclean scores on a GPU against what
the network alone allows, eager and compiled, by precision; which precision keeps the evidence
sets' rankings; and the `memclean score` command end to end.

    python benchmarks/gpu.py --out DIR [--sections network,precision,cli] [--device cuda]

network: for google/ddpm-cifar10-32's UNet configuration (35.7M parameters) at 64 px and
    google/ddpm-celebahq-256's (113.7M) at 256 px, random weights, the examples' photo tiles
    resized: the network's own forward and forward+VJP images/s (CUDA events after warm-up: the
    limit of a scoring pass is 1 / (16 / fwd+VJP + 16 / fwd) with the default scorer's 16
    evaluations of V and 16 loss noises), memclean's scoring (score.scoring.fresh_scores, batch
    after batch, the first batch untimed) images/s and its share of that limit, the FLOP/s it
    reaches against the chip's measured bf16 rate, each arm's Spearman with eager fp32 for V and
    the loss, and each compiled arm's compile seconds; then one batch of the compiled bf16 arm at
    64 px (the largest gap to the limit) under torch.profiler: the device's busy share and the
    operations that take most device and host time (profile_batch).
precision: the evidence models (the demo digits, the photo tiles) scored with seeds 0 and 1 in
    each precision: the judged score's and V's seed-to-seed Spearman, their Spearman with fp32 at
    the same seed (rounding alone), and the AUCs (members vs held-out, duplicated vs unique).
cli: `memclean score` on 64 px tiles with its CUDA defaults (batch and compile auto) and with
    --compile off: images/s of the score stage (the Parquet footer's timings).
Each section appends to DIR/gpu.md as it finishes, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.results import hardware  # noqa: E402
from pipeline.score.models import LoadedModel, load_model  # noqa: E402
from pipeline.score.scoring import fresh_scores  # noqa: E402
from pipeline.score.volume import ScorerSettings, network_precision  # noqa: E402

BF16_RATE = 790e12  # the H200's bf16 matrix rate as measured on it (../shared/GPU.md), FLOP/s
PASS = (16, 16)  # the default scorer's network calls an image: forward+VJP (Heun-8 V), forward (16 loss noises)
CONFIGS = {  # name: (UNet2DModel arguments, image side, batch, images scored per arm)
    "cifar10@64": (dict(layers_per_block=2, block_out_channels=(128, 256, 256, 256),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")), 64, 256, 512),
    "celebahq@256": (dict(layers_per_block=2, block_out_channels=(128, 128, 256, 256, 512, 512),
                          down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4), 256, 32, 64),
}
# in order of what matters (a run cut short keeps the first); fp32 at 256 px is in ../shared/GPU.md
ARMS = {"cifar10@64": [("eager", "bf16"), ("compiled", "bf16"), ("eager", "fp32"), ("eager", "tf32")],
        "celebahq@256": [("eager", "bf16"), ("compiled", "bf16"), ("eager", "tf32")]}


def save_random_unet(name: str, folder: Path, quick: bool) -> Path:
    """A configuration's UNet with random weights (seeded) and a linear DDPM schedule, saved as
    a diffusers pipeline; --quick shrinks the channels (a CPU dry run)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    kwargs, side, _, _ = CONFIGS[name]
    if quick:
        kwargs = {**kwargs, "block_out_channels": tuple(c // 16 for c in kwargs["block_out_channels"]),
                  "norm_num_groups": 4}
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=side, in_channels=3, out_channels=3, attention_head_dim=None, **kwargs)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def tiles(side: int, n: int, folder: Path | None = None) -> torch.Tensor:
    """n of the examples' 32x32 photo tiles (members and held-out), resized to side x side with
    bicubic: [n, 3, side, side] in [-1, 1]; also written as PNGs to `folder` when given."""
    files = sorted((REPO / "examples/photos").glob("*/*.png"))
    out = []
    for k in range(n):
        img = Image.open(files[k % len(files)]).convert("RGB").resize((side, side), Image.BICUBIC)
        if k >= len(files):  # a second round: mirrored, so that no two inputs are the same
            img = img.transpose(Image.FLIP_LEFT_RIGHT).rotate(90 * (k // len(files)))
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"t{k:05d}.png")
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def timed(fn, device: torch.device, reps: int) -> float:
    """Seconds a call of fn takes, after two warm-up calls: CUDA events on a GPU, else the clock."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def network_rates(model: LoadedModel, x: torch.Tensor, precision: str, reps: int) -> tuple[float, float]:
    """The network's own images/s on the batch x: forward, and forward with the input VJP that V's
    divergence needs, through the same call the scorer makes (DiffusersScore.network)."""
    f = model.score_fn
    ts = torch.full((x.shape[0],), 500.0, device=x.device)
    v = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            f.network(x, ts)

    def vjp():
        y = x.detach().requires_grad_(True)
        torch.autograd.grad(f.network(y, ts), y, v)
    with network_precision(precision, x.device):
        return x.shape[0] / timed(forward, x.device, reps), x.shape[0] / timed(vjp, x.device, reps)


def flops(model: LoadedModel, x: torch.Tensor) -> tuple[float, float]:
    """FLOPs of one image's forward and forward+VJP (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    f, ts = model.score_fn, torch.full((1,), 500.0, device=x.device)
    compiled, f.compiled = f.compiled, None
    try:
        with FlopCounterMode(display=False) as c:
            with torch.no_grad():
                f.network(x[:1], ts)
        y = x[:1].detach().requires_grad_(True)
        with FlopCounterMode(display=False) as c2:
            f.network(y, ts).backward(torch.ones_like(y))  # autograd.grad trips the counter's module hooks
    finally:
        f.compiled = compiled
    return float(c.get_total_flops()), float(c2.get_total_flops())


def scoring(model: LoadedModel, x: torch.Tensor, settings: ScorerSettings, batch: int,
            device: torch.device) -> tuple[float, np.ndarray, np.ndarray, int | None]:
    """memclean's scoring of x batch by batch: images/s over all but the first batch (untimed,
    warm-up), V and the loss of every image, and (CUDA) the host synchronisations of the first
    batch, each a point where the device drains (torch.cuda.set_sync_debug_mode's warnings)."""
    first = x[:batch].to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            rows = fresh_scores(model, first, settings)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for s in range(batch, len(x), batch):
        rows += fresh_scores(model, x[s:s + batch].to(device), settings)
    seconds = time.perf_counter() - t0
    return ((len(x) - batch) / seconds, np.array([r["log_volume_growth"] for r in rows]),
            np.array([r["denoising_loss"] for r in rows]), syncs)


PROFILED = {("cifar10@64", "compiled", "bf16")}  # arms whose batch is profiled: the largest gap to the limit


def profile_batch(model: LoadedModel, xb: torch.Tensor, settings: ScorerSettings, batch_seconds: float,
                  top: int = 8) -> list[str]:
    """One batch of memclean's scoring under torch.profiler, as gpu.md lines: the device's kernel
    time against the batch's unprofiled time (the share the device is busy), and the operations
    that take most device time and most host time (a wait on the device shows as host time in
    cudaStreamSynchronize, cudaMemcpyAsync or aten::_local_scalar_dense)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = xb.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fresh_scores(model, xb, settings)  # warm: the profiler's first batch carries set-up
    if cuda:
        torch.cuda.synchronize(xb.device)
    with profile(activities=activities) as prof:
        fresh_scores(model, xb, settings)
        if cuda:
            torch.cuda.synchronize(xb.device)
    events = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
    kernels = sum(device_us(e) for e in events) / 1e6
    lines = [f"\nOne batch of {xb.shape[0]} profiled: device kernels {kernels:.2f} s against the batch's "
             f"unprofiled {batch_seconds:.2f} s (busy {kernels / batch_seconds:.0%})" if cuda else
             f"\nOne batch of {xb.shape[0]} profiled (no device: host times only; unprofiled {batch_seconds:.2f} s)",
             "", "| by | operation | self ms | share |", "|---|---|---|---|"]
    total_host = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = []
    if cuda:
        by_device = [e for e in sorted(events, key=device_us, reverse=True)[:top] if device_us(e) > 0]
        ranked += [("device", e, device_us(e), kernels * 1e6) for e in by_device]
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ranked += [("host", e, e.self_cpu_time_total, total_host) for e in by_host]
    for by, e, us, whole in ranked:
        lines.append(f"| {by} | {e.key[:70].replace('|', '/')} | {us / 1e3:.1f} | {us / whole:.1%} |")
    return lines


def network_section(args, tmp: Path, out) -> None:
    device = torch.device(args.device)
    for name in args.configs:
        _, side, batch, n = CONFIGS[name]
        batch, n = (4, 12) if args.quick else (batch, n)
        model = load_model(save_random_unet(name, tmp / name, args.quick), device=device)
        x = tiles(side, n)
        xb = x[:batch].to(device)
        f_fwd, f_vjp = flops(model, xb)
        params = sum(p.numel() for p in model.score_fn.unet.parameters()) / 1e6
        out(f"\n### {name}: {params:.1f}M parameters, {side} px, batch {batch}, {n} images an arm "
            f"(the first batch untimed); {f_fwd / 1e9:.1f} GFLOP a forward pass, {f_vjp / 1e9:.1f} forward+VJP\n")
        out("| arm | precision | compile s | network fwd images/s | fwd+VJP images/s | limit images/s a pass "
            "| memclean images/s a pass | share of limit | TFLOP/s | share of bf16 rate | host syncs a batch "
            "| Spearman V / loss vs eager fp32 |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|")
        base, pending, profiled = None, [], []
        for mode, precision in ARMS[name]:
            settings = ScorerSettings(precision=precision)
            compile_s = ""
            if mode == "compiled":
                model.score_fn.compile(batch)
                t0 = time.perf_counter()
                fresh_scores(model, xb, replace(settings, steps=1, solver="euler", loss_noises=1))
                compile_s = f"{time.perf_counter() - t0:.0f}"
            else:
                model.score_fn.compiled = None
            fwd, vjp = network_rates(model, xb, precision, 3 if args.quick else 10)
            limit = 1 / (PASS[0] / vjp + PASS[1] / fwd)
            rate, V, loss, syncs = scoring(model, x, settings, batch, device)
            tflops = rate * (PASS[0] * f_vjp + PASS[1] * f_fwd) / 1e12
            if (mode, precision) == ("eager", "fp32"):
                base = (V, loss)
            row = [mode, precision, compile_s, f"{fwd:.0f}", f"{vjp:.0f}", f"{limit:.1f}", f"{rate:.1f}",
                   f"{rate / limit:.0%}", f"{tflops:.3g}", f"{tflops * 1e12 / BF16_RATE:.1%}",
                   "-" if syncs is None else str(syncs)]
            pending.append((row, V, loss))
            if (name, mode, precision) in PROFILED:
                profiled = profile_batch(model, xb, settings, batch / rate)
            if base is not None:  # arms before fp32 get their Spearman once it is measured
                for r, Vr, lr in pending:
                    out("| " + " | ".join(r + [f"{spearmanr(base[0], Vr)[0]:.4f} / {spearmanr(base[1], lr)[0]:.4f}"])
                        + " |")
                pending = []
        for r, _, _ in pending:
            out("| " + " | ".join(r + ["-"]) + " |")
        for line in profiled:
            out(line)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def precision_section(args, tmp: Path, out) -> None:
    from benchmarks.scores import images, planted_ids, score_all, take
    from pipeline.decide.scores import calibrate, judged
    from pipeline.score.scoring import image_spec
    from pipeline.tools.evaluate import roc_auc

    out("\n### Precision on the evidence models (seeds 0 and 1; the reference: half the held-out images, "
        "as benchmarks/scores.py splits them)\n")
    out("| set | precision | score | seed-to-seed Spearman | Spearman vs fp32 (same seed) | AUC members vs held-out "
        "| AUC duplicated vs unique | scoring s |")
    out("|---|---|---|---|---|---|---|---|")
    for name, data, model_dir in (("digits", "examples/digits", "examples/model"),
                                  ("photos", "examples/photos", "examples/photo-model")):
        model = load_model(REPO / model_dir, device=args.device)
        spec = image_spec(model)
        member_ids, xm = images(REPO / data / "train", spec)
        _, xh = images(REPO / data / "heldout", spec)
        if args.quick:
            xm, xh, member_ids = xm[:24], xh[:24], member_ids[:24]
        dup = np.array([i in planted_ids(REPO / data) for i in member_ids])
        x, n_m = torch.cat([xm, xh]), len(xm)
        order = np.random.default_rng(0).permutation(len(xh))
        ref, ev = n_m + np.sort(order[: len(order) // 2]), n_m + np.sort(order[len(order) // 2:])
        fp32 = {}
        for precision in ("fp32", "tf32", "bf16"):
            t0 = time.perf_counter()
            runs = [score_all(model, x, ScorerSettings(seed=seed, precision=precision), args.device, 256)
                    for seed in (0, 1)]
            seconds = (time.perf_counter() - t0) / 2
            for score in ("calibrated_denoising_score", "log_volume_growth"):
                v = [judged(r, score, calibrate(take(r, ref), "reference"))[0] for r in runs]
                fp32.setdefault(score, v[0])
                m = v[0][:n_m]
                out(f"| {name} | {precision} | {score} | {spearmanr(v[0], v[1])[0]:.4f} "
                    f"| {spearmanr(fp32[score], v[0])[0]:.4f} | {roc_auc(m, v[0][ev]):.3f} "
                    f"| {roc_auc(m[dup], m[~dup]) if dup.any() and (~dup).any() else float('nan'):.3f} | {seconds:.1f} |")


def cli_section(args, tmp: Path, out) -> None:
    import pyarrow.parquet as pq

    name = "cifar10@64"
    _, side, _, _ = CONFIGS[name]
    n = 24 if args.quick else 1024
    model = tmp / name if (tmp / name).exists() else save_random_unet(name, tmp / name, args.quick)
    data = tmp / "tiles64"
    tiles(side, n, data)
    out(f"\n### `memclean score` on {n} 64 px tiles, {name}, --device {args.device}\n")
    out("| options | batch | compile s | score s | images/s | whole command s |")
    out("|---|---|---|---|---|---|")
    memclean = [sys.executable, "-m", "memclean.cli"]
    for extra in (["--precision", "bf16"], ["--precision", "bf16", "--compile", "off"]):
        target = tmp / f"score{len(extra)}.parquet"
        t0 = time.perf_counter()
        proc = subprocess.run(memclean + ["score", "--data", str(data), "--model", str(model), "--out", str(target),
                                          "--device", args.device, "--overwrite", *extra],
                              capture_output=True, text=True, cwd=REPO)
        whole = time.perf_counter() - t0
        if proc.returncode:
            out(f"| {' '.join(extra)} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | |")
            continue
        metadata = pq.read_metadata(target).metadata
        meta, t = json.loads(metadata[b"memclean"]), json.loads(metadata[b"memclean_run"])["timings_s"]
        out(f"| {' '.join(extra) or 'defaults'} | {meta['settings']['batch_size']} | {t.get('compile', 0):.0f} "
            f"| {t['score']:.1f} | {n / t['score']:.1f} | {whole:.0f} |")


SECTIONS = {"network": network_section, "precision": precision_section, "cli": cli_section}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check-out", help="folder for gpu.md")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="network,cli,precision", help="comma-separated: network, precision, cli")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help="tiny models and few images: a dry run of the script")
    args = ap.parse_args()
    args.configs = args.configs.split(",")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "gpu.md"

    def out(line: str) -> None:
        print(line, flush=True)
        with open(report, "a") as f:
            f.write(line + "\n")
    out(f"## GPU: `benchmarks/gpu.py` ({hardware(args.device)}{', --quick' if args.quick else ''})")
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections.split(","):
            t0 = time.perf_counter()
            try:
                SECTIONS[section](args, Path(tmp), out)
            except Exception as e:  # a section that breaks leaves the others' numbers standing
                out(f"\n{section}: failed: {type(e).__name__}: {e}")
            print(f"[{section}: {time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
