"""Log volume growth of the probability-flow ODE: V(x) = integral_eps^1 div f(x_t, t) dt.

The ODE is integrated with torchdiffeq from the image (t = eps) to latent noise (t = 1); then
log p(x) = log p_1(x_1) + V(x) (instantaneous change of variables, score_sde's likelihood).

It is solved in the variables of Karras et al. (2022, EDM, eq. 4): the scaled state
xbar = x / alpha(t) against the scaled noise level sbar = sigma(t) / alpha(t), where

    dxbar/dsbar = g(xbar, t) = -sigma(t) score(alpha(t) xbar, t)    (VP: = eps_hat; VE: alpha = 1)
    V = D (log alpha(1) - log alpha(eps)) + integral div_xbar g dsbar    (change of variables)

The linear part of f (-beta x / 2) is integrated exactly, and the path of an image the model
reproduces exactly (data concentrated at a point) is a straight line in sbar, which Euler
(= DDIM) and Heun (= EDM's sampler) follow without error; there div g = D / sbar, and Euler's
and Heun's rules for V are weighted to be exact for it (see `stage_weights`).
The state, and so V, is float64; the network runs in its own dtype (or `precision`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_METHODS  # its table of methods: the host-grid ones join it

from pipeline.fields import check_choices, setting
from pipeline.score.models import ScoreFunction
from pipeline.score.probes import ProbeStream, to_device


Field = Callable[[torch.Tensor], torch.Tensor]  # a vector field of the state: [B, ...] -> [B, ...]
DIVERGENCES = ("exact", "rademacher", "gaussian")
ADAPTIVE_SOLVERS = {"dopri5": "dopri5"}
FIXED_GRID_SOLVERS = {"euler": "euler", "heun": "heun2", "rk4": "rk4"}  # ours -> torchdiffeq
STAGES = {"euler": 1, "heun": 2, "rk4": 4}  # drift evaluations per step
SOLVERS = tuple(FIXED_GRID_SOLVERS) + tuple(ADAPTIVE_SOLVERS)
GRIDS = ("log_snr", "uniform")
PROBE_MODES = ("fresh", "fixed")
PRECISIONS = ("fp32", "tf32", "bf16")
SCORER_VERSION = 3  # bumped when the same settings would give a different number (cache keys)
# measured by benchmarks/evidence.py on the digits and the photo tiles (RESULTS.md)
DEFAULT_WINDOW_START = 0.02
DEFAULT_LOSS_T = 0.1


HOST_GRID = "memclean-host-grid-"  # torchdiffeq's fixed-grid methods, their loop over the grid's host copy


def _host_grid(solver: type) -> type:
    """torchdiffeq's fixed-grid `solver`, stepping over the grid's host copy (the option host_t):
    its loop compares each step's end with the next output time, and with the times on a GPU each
    comparison reads them back (4 synchronisations a step, each draining the device). The steps
    are torchdiffeq's own (t0, dt = t1 - t0, its stage arithmetic), in float64 on the host, as
    0-dim tensors the device's arithmetic takes as scalars."""

    class HostGrid(solver):
        def __init__(self, *args, host_t: torch.Tensor, **kwargs):
            super().__init__(*args, **kwargs)
            if host_t.device.type != "cpu" or host_t.dim() != 1 or not bool((host_t[1:] > host_t[:-1]).all()):
                raise ValueError("host_t must be an increasing grid on the host")
            self.host_t = host_t

        def integrate(self, t):
            if len(t) != len(self.host_t):  # t: the same grid, moved to the state's device (its shape: no read)
                raise ValueError(f"the grid has {len(t)} times, host_t {len(self.host_t)}")
            return super().integrate(self.host_t)

    HostGrid.__name__ = f"HostGrid{solver.__name__}"
    return HostGrid


for _name in FIXED_GRID_SOLVERS.values():
    TORCHDIFFEQ_METHODS.setdefault(HOST_GRID + _name, _host_grid(TORCHDIFFEQ_METHODS[_name]))
# the grid goes to odeint on the host, so that its checks of t read no device; it moves t to the
# state's device once, and says so
warnings.filterwarnings("ignore", message="t is not on the same device as y0", category=UserWarning,
                        module="torchdiffeq")
DEFAULT_LOSS_NOISES = 16


@dataclass(frozen=True)
class ScorerSettings:
    """Everything that, with the model and the image, determines a score."""

    divergence: str = setting("rademacher", "div f: exact (D backward passes; tiny images) or Hutchinson-Skilling "
                              "probes", choices=DIVERGENCES)
    probes: int = setting(1, "Hutchinson probes per drift evaluation")
    probe_mode: str | None = setting(
        None, "fresh: new probes at every drift evaluation (fixed grids; the noise averages over the evaluations); "
        "fixed: one set for the whole solve; default: fresh for heun/euler/rk4, fixed for dopri5, whose step "
        "control needs a deterministic right-hand side", choices=PROBE_MODES, aliases=("probes_per_step",))
    solver: str = setting("heun", "heun, euler, rk4: a fixed grid of --steps; dopri5: adaptive (--rtol/--atol, "
                          "fixed probes, one image at a time, about 40x slower)", choices=SOLVERS)
    steps: int = setting(8, "fixed-grid steps (8: benchmarks/scoring.py chose it)")
    rtol: float = setting(1e-5, "dopri5 relative tolerance (score_sde's)")
    atol: float = setting(1e-5, "dopri5 absolute tolerance")
    eps: float = setting(1e-5, "start time of the solve: the image is x_eps")
    seed: int = setting(0, "probe seed, hashed with each image's content, the evaluation and the element")
    grid: str = setting("log_snr", "fixed-grid times: uniform in log-SNR (accurate on sharply peaked image data) "
                        "or in t", choices=GRIDS)
    precision: str | None = setting(None, "the network's arithmetic: fp32, tf32 (CUDA matmuls and convolutions) or "
                                    "bf16 (autocast); default: bf16 on CUDA (it kept the evidence sets' rankings within "
                                    "fp32's seed-to-seed noise: RESULTS.md, GPU), fp32 on the CPU; V is float64 "
                                    "whatever it is", choices=PRECISIONS)
    window_start: float = setting(DEFAULT_WINDOW_START, "window_volume_growth is V over [t0, 1] from the same solve, "
                                  "t0 the first grid time at or after this (dropping the stretch nearest the data)")
    loss_t: float = setting(DEFAULT_LOSS_T, "time of the denoising loss (the network's timestep t (N - 1))")
    loss_noises: int = setting(DEFAULT_LOSS_NOISES, "seeded noises the denoising loss averages (0: no loss)")

    def __post_init__(self) -> None:
        if not 1 <= self.probes <= 1024:
            raise ValueError(f"probes must be between 1 and 1024, got {self.probes}")
        if self.probe_mode is None:  # resolved here, so rows and cache keys record what ran
            object.__setattr__(self, "probe_mode", "fixed" if self.solver in ADAPTIVE_SOLVERS else "fresh")
        check_choices(self)  # divergence, solver, probe_mode, grid, precision
        if self.probe_mode == "fresh" and self.solver in ADAPTIVE_SOLVERS:
            raise ValueError(f"probe_mode 'fresh' needs a fixed-grid solver: {self.solver}'s step "
                             "control needs a deterministic right-hand side (use --probe-mode fixed)")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"rtol and atol must be positive, got {self.rtol}, {self.atol}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps}")
        if not self.eps <= self.window_start < 1:
            raise ValueError(f"--window-start must lie in [eps, 1), got {self.window_start}")
        if not 0 < self.loss_t <= 1 or not 0 <= self.loss_noises <= 1024:
            raise ValueError(f"--loss-t must lie in (0, 1] and --loss-noises in [0, 1024], got {self.loss_t}, "
                             f"{self.loss_noises}")

    @property
    def adaptive(self) -> bool:
        return self.solver in ADAPTIVE_SOLVERS

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VolumeResult:
    """Per-image results of one solve, all [B]; `latent` is x_1: [B, C, H, W]."""

    log_volume_growth: torch.Tensor  # V(x) = integral of div f, float64
    prior_logp: torch.Tensor  # log p_1(x_1) under the schedule's prior
    logp: torch.Tensor  # prior_logp + log_volume_growth
    bits_per_dim: torch.Tensor  # -logp / (D ln 2) + log2(255 / (hi - lo)) (8-bit data in [lo, hi])
    nfe: torch.Tensor  # drift evaluations spent on each image, int64
    latent: torch.Tensor  # x_1
    log_volume_growth_se: torch.Tensor | None = None  # standard error of V from its probes (variance_of)
    window_volume_growth: torch.Tensor | None = None  # V over [window start, 1], from the same solve
    window_volume_growth_se: torch.Tensor | None = None  # its standard error
    profile: tuple[torch.Tensor, torch.Tensor] | None = None  # (times [T], V over [t, 1] at each: [T, B])


def drift(score_fn: ScoreFunction, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Probability-flow drift f(x, t) = a(t) x + b(t) score(x, t): [B, ...] -> [B, ...]."""
    a, b = score_fn.schedule.drift_coefficients(t)
    return torch.as_tensor(a, dtype=x.dtype) * x + torch.as_tensor(b, dtype=x.dtype) * score_fn.score(x, t)


def scaled_rate(score_fn: ScoreFunction, t: torch.Tensor) -> Field:
    """g(xbar) = dxbar/dsbar = -sigma(t) score(alpha(t) xbar, t) at time t: [B, ...] -> [B, ...]."""
    schedule = score_fn.schedule
    alpha, sigma = torch.exp(schedule.log_alpha(t)), schedule.sigma(t)
    return lambda xbar: -sigma * score_fn.score(alpha * xbar, t)


def field_and_vjps(fn: Field, y: torch.Tensor, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(y) and the rows v^T (d fn/dy) for each v: y [B, ...], vs [K, B, ...] -> ([B, ...], [K, B, ...]).

    The batch is replicated K times so that one batched forward and one backward pass serve
    all K products (images are independent: the network normalises per sample).
    """
    K, B = vs.shape[0], y.shape[0]
    y_rep = y.detach().repeat(K, *([1] * (y.dim() - 1))).requires_grad_(True)  # [K B, ...]
    out = fn(y_rep)
    if not out.requires_grad:  # a field that ignores its input (a zero network)
        return out[:B].detach(), torch.zeros_like(vs)
    (rows,) = torch.autograd.grad(out, y_rep, vs.reshape(K * B, *y.shape[1:]).to(out.dtype))
    return out[:B].detach(), rows.view(vs.shape)


def hutchinson_divergence(fn: Field, y: torch.Tensor, probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(y) and div fn ~ 1/K sum_k v_k^T (d fn/dy) v_k: y [B, ...], probes [K, B, ...] -> ([B, ...], [B])."""
    out, rows = field_and_vjps(fn, y, probes)
    return out, (rows * probes).flatten(2).sum(2).mean(0)


def probe_variance(rows: torch.Tensor, probes: torch.Tensor, kind: str) -> torch.Tensor:
    """An estimate of Var(v^T A v) for each probe from its own product r = v^T A: rows and
    probes [K, B, ...] -> [K, B] float64.

    For a symmetric A (the Jacobian of a score is a Hessian): Gaussian probes have variance
    2 ||A||_F^2; Rademacher probes 2 (||A||_F^2 - sum_i A_ii^2) <= 2 (||A||_F^2 - (tr A)^2 / D)
    (Cauchy-Schwarz), equal when A's diagonal is constant (A = c I: 0). E ||r||^2 = ||A||_F^2
    (E[v v^T] = I) and d = r v estimates tr A, so the estimate is 2 ||r||^2, and for Rademacher
    probes 2 max(0, ||r||^2 - d^2 / D): an upper bound where the diagonal varies.
    """
    r = rows.flatten(2).to(torch.float64)
    r2 = r.pow(2).sum(2)
    if kind == "gaussian":
        return 2 * r2
    d = (r * probes.flatten(2).to(torch.float64)).sum(2)
    return 2 * (r2 - d**2 / r.shape[2]).clamp_min(0)


def exact_divergence(fn: Field, y: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(y) and div fn = sum_d e_d^T (d fn/dy) e_d, in chunks of basis vectors: y [B, ...] -> ([B, ...], [B])."""
    B, D = y.shape[0], y[0].numel()
    div = torch.zeros(B, dtype=torch.float64, device=y.device)
    for start in range(0, D, chunk):
        d = torch.arange(start, min(start + chunk, D), device=y.device)
        k = torch.arange(len(d), device=y.device)  # on the device too: a host index is copied there
        basis = torch.zeros(len(d), B, D, dtype=y.dtype, device=y.device)
        basis[k, :, d] = 1
        out, rows = field_and_vjps(fn, y, basis.view(len(d), *y.shape))
        div += rows.flatten(2)[k, :, d].sum(0).to(torch.float64)
    return out, div


def stage_weights(sbar: torch.Tensor, solver: str) -> torch.Tensor | None:
    """Factors on dV/dsbar at each stage of each step that make the V rule exact where the
    integrand q = sbar div g is constant in u = log sbar (data at a point) -- [steps, stages].

    q is constant where the model resolves an image as a point, and grows like sbar below the
    noise levels the network was trained on (t (N - 1) < 1), where it acts as a fixed linear
    map. Heun's trapezoid (ds/2)(r_0 + r_1) on r = dV/dsbar is exact for r in {1, sbar}; the
    weights w_0, w_1 here are exact for r in {1 / sbar, 1} instead (q const, q ~ sbar):
        w_0 + w_1 = ds,   w_0 / s_0 + w_1 / s_1 = du = log(s_1 / s_0).
    Euler's one node: the rectangle du q_0 in u. A rule in sbar would overstate V by up to
    sinh(du)/du - 1 where q is constant (18% at du = 1). None for rk4: its 3/8 rule is exact for
    q ~ sbar and errs 0.35% on q const at du = 1.
    """
    s0, s1 = sbar[:-1], sbar[1:]
    ds, du = s1 - s0, torch.log(s1 / s0)
    if solver == "euler":
        return (s0 * du / ds)[:, None]
    if solver == "heun":
        w0 = s0 * (du * s1 - ds) / ds
        return torch.stack([w0, ds - w0], 1) / (ds / 2)[:, None]
    return None


def quadrature(sbar: torch.Tensor, solver: str) -> torch.Tensor:
    """How torchdiffeq's fixed-grid step combines its stages' rates into the increment of V:
    [steps, stages] (heun2: ds/2 each; euler: ds; rk4, the 3/8 rule: ds (1, 3, 3, 1) / 8)."""
    ds = (sbar[1:] - sbar[:-1])[:, None]
    b = {"euler": [1.0], "heun": [0.5, 0.5], "rk4": [0.125, 0.375, 0.375, 0.125]}[solver]
    return ds * torch.tensor(b, dtype=ds.dtype, device=ds.device)


class ProbeNoise:
    """The variance of a fixed-grid V (and of its window's) from the probes' own products.

    V = sum_k c_k d_k with c the quadrature coefficients times the stage weights (one per drift
    evaluation k) and d_k the K-probe mean of evaluation k. The trajectory never reads V, so with
    fresh probes the d_k are independent: Var V = sum_k c_k^2 Var(d_k). With one fixed probe set,
    V = mean_j v_j^T M v_j with M = sum_k c_k A_k, whose variance comes from R = sum_k c_k r_k
    (probe_variance of M). Evaluations of steps from `window_step` on make the window's.
    """

    def __init__(self, coefficients: torch.Tensor, fresh: bool, kind: str, window_step: int):
        self.c, self.fresh, self.kind = coefficients, fresh, kind
        self.first = window_step * coefficients.shape[1]  # the window's first evaluation
        self.c = coefficients.reshape(-1)
        self.parts: dict[str, object] = {}

    def add(self, k: int, rows: torch.Tensor, probes: torch.Tensor) -> None:
        c = float(self.c[k])
        for name in ("whole", "window") if k >= self.first else ("whole",):
            if self.fresh:
                var = probe_variance(rows, probes, self.kind).mean(0) / rows.shape[0]
                self.parts[name] = self.parts.get(name, 0) + c**2 * var
            else:
                self.parts[name] = self.parts.get(name, 0) + c * rows.to(torch.float64)
        self._probes = probes

    def variance(self, name: str) -> torch.Tensor | None:
        part = self.parts.get(name)
        if part is None:
            return None
        if self.fresh:
            return part
        return probe_variance(part, self._probes, self.kind).mean(0) / part.shape[0]


def stage_sbar(sbar: torch.Tensor, solver: str) -> torch.Tensor:
    """The sbar at which torchdiffeq's fixed-grid step evaluates the drift, evaluation after
    evaluation, computed as it computes them (dt = t1 - t0, then t0 + dt c): [steps * stages].
    euler: t0; heun2: t0, t0 + dt; rk4 (the 3/8 rule): t0, t0 + dt/3, t0 + 2 dt/3, t1."""
    t0, t1 = sbar[:-1], sbar[1:]
    dt = t1 - t0
    stages = {"euler": [t0], "heun": [t0, t0 + dt * 1.0],
              "rk4": [t0, t0 + dt * (1 / 3), t0 + dt * (2 / 3), t1]}[solver]
    return torch.stack(stages, 1).reshape(-1)


class AugmentedDrift(torch.nn.Module):
    """d[xbar, V]/dsbar = [g, div g] (module docstring) for torchdiffeq; counts its evaluations.

    Evaluation k estimates div g with the probes `probes(k)` (fresh or fixed), or exactly when
    `probes` is None; on a fixed grid, dV/dsbar at stage i of step n is scaled by weights[n, i]
    (`stage_weights`, on the host), and `noise` (a ProbeNoise) collects what V's variance needs.
    `times`: a fixed grid's times of every evaluation (t of stage_sbar), on the images' device,
    so that an evaluation never reads its sbar back to the host (on a GPU, a synchronisation
    that drains the device at every evaluation); without them (an adaptive solver's steps)
    t is computed from sbar on the host.
    """

    def __init__(self, score_fn: ScoreFunction, probes: ProbeStream | None,
                 weights: torch.Tensor | None = None, noise: ProbeNoise | None = None,
                 times: torch.Tensor | None = None):
        super().__init__()
        self.score_fn, self.probes, self.weights, self.noise = score_fn, probes, weights, noise
        self.times = times
        self.nfe = 0

    def forward(self, sbar: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        k, self.nfe = self.nfe, self.nfe + 1
        if self.times is not None:
            t = self.times[k]
        else:
            t = self.score_fn.schedule.t_of_sigma_bar(sbar.cpu()).to(sbar.device)
        rate = scaled_rate(self.score_fn, t)
        with torch.enable_grad():
            if self.probes is None:
                g, div = exact_divergence(rate, state[0])
            else:
                v = self.probes(k)
                g, rows = field_and_vjps(rate, state[0], v)
                div = (rows * v).flatten(2).sum(2).mean(0)
                if self.noise is not None:
                    self.noise.add(k, rows, v)
        if self.weights is not None:
            div = div * float(self.weights.view(-1)[k])  # a host tensor: no synchronisation
        return g, div.to(torch.float64)


@dataclass
class Solve:
    """One batch's solve: x_1, V, and what the window and the standard errors need."""

    latent: torch.Tensor  # x_1 [B, ...]
    V: torch.Tensor  # [B] float64
    nfe: int
    window: torch.Tensor  # V over [window start, 1]: [B] float64
    var: torch.Tensor | None  # Var V [B] (None: not estimable: an adaptive solver's)
    window_var: torch.Tensor | None
    times: torch.Tensor  # the solve's output times [T]
    profile: torch.Tensor  # V over [t, 1] for each of them: [T, B]


def _solve(score_fn: ScoreFunction, x: torch.Tensor, settings: ScorerSettings,
           keys: list[int] | None = None) -> Solve:
    """Integrate [xbar, V] from eps to 1 for one batch."""
    schedule = score_fn.schedule
    probes = None if settings.divergence == "exact" else ProbeStream(
        x, settings.seed, settings.probes, settings.divergence, settings.probe_mode == "fresh", keys)
    state0 = (x.to(torch.float64) / math.exp(schedule.log_alpha(torch.tensor(settings.eps, dtype=torch.float64))),
              torch.zeros(x.shape[0], dtype=torch.float64, device=x.device))
    if settings.adaptive:
        times = torch.tensor([settings.eps, settings.window_start, 1.0], dtype=torch.float64).unique()
        func = AugmentedDrift(score_fn, probes)
        sbar = schedule.sigma_bar(times).to(x.device)
        # step_t: the last step lands on t = 1 instead of overshooting and interpolating back,
        # so the network is never evaluated outside the schedule's [0, 1]
        xs, vs = odeint(func, state0, sbar, rtol=settings.rtol, atol=settings.atol,
                        method=ADAPTIVE_SOLVERS[settings.solver], options={"step_t": sbar[1:]})
        noise, start = None, len(times) - 2
    else:
        times = time_grid(schedule, settings)
        # the grid's weights, variance coefficients and evaluation times on the host, computed
        # once a solve: the evaluations read them without a synchronisation
        sbar = schedule.sigma_bar(times)
        weights = stage_weights(sbar, settings.solver)
        start = window_index(times, settings.window_start)
        noise = None if probes is None else ProbeNoise(
            quadrature(sbar, settings.solver) * (1 if weights is None else weights), probes.fresh, probes.kind, start)
        evaluation_times = schedule.t_of_sigma_bar(stage_sbar(sbar, settings.solver))
        if probes is not None:
            probes.plan(len(evaluation_times))
        func = AugmentedDrift(score_fn, probes, weights, noise, to_device(evaluation_times, x.device))
        # the grid stays on the host: the solver's loop and odeint's checks read no device
        xs, vs = odeint(func, state0, sbar, method=HOST_GRID + FIXED_GRID_SOLVERS[settings.solver],
                        options={"host_t": sbar})
    log_alpha = schedule.log_alpha(times)
    D = x[0].numel()
    V = vs[-1] + D * float(log_alpha[-1] - log_alpha[0])  # the linear part, exactly
    profile = vs[-1][None] - vs + D * to_device((log_alpha[-1] - log_alpha)[:, None].to(vs.dtype), vs.device)
    window = profile[start]
    exact = probes is None
    var = torch.zeros_like(V) if exact else (noise.variance("whole") if noise else None)
    window_var = torch.zeros_like(V) if exact else (noise.variance("window") if noise else None)
    return Solve(xs[-1] * math.exp(log_alpha[-1]), V, func.nfe, window, var,
                 torch.zeros_like(V) if window_var is None and noise is not None else window_var, times, profile)


def window_index(times: torch.Tensor, start: float) -> int:
    """The first grid time at or after `start` (the window's start), as an index into times."""
    at = int(torch.searchsorted(times, torch.tensor(start, dtype=times.dtype) * (1 - 1e-12)))
    return min(at, len(times) - 2)


def time_grid(schedule, settings: ScorerSettings) -> torch.Tensor:
    """The fixed-grid solvers' times, eps to 1: [steps + 1] float64.

    'log_snr' (default) spaces them uniformly in log-SNR = -2 log sbar: geometric in sbar, so
    steps are fine where the data's own scale takes over from the noise (near t = eps, where a
    grid uniform in t put one step across [eps, 1/steps] and its error swamped V) and where the
    schedule is steep near t = 1. 'uniform' spaces them uniformly in t.
    """
    if settings.grid == "uniform":
        return torch.linspace(settings.eps, 1.0, settings.steps + 1, dtype=torch.float64)
    ends = torch.log(schedule.sigma_bar(torch.tensor([settings.eps, 1.0], dtype=torch.float64)))
    u = torch.linspace(float(ends[0]), float(ends[1]), settings.steps + 1, dtype=torch.float64)
    t = schedule.t_of_sigma_bar(torch.exp(u))
    t[0], t[-1] = settings.eps, 1.0
    return t


def precision_for(precision: str | None, device: str | torch.device) -> str:
    """--precision resolved: unset is bf16 on CUDA and fp32 elsewhere (benchmarks/gpu.py measured
    bf16 within fp32's seed-to-seed noise on the evidence sets; bf16 autocast on a CPU is slow)."""
    if precision is not None:
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


@contextlib.contextmanager
def network_precision(precision: str | None, device: torch.device) -> Iterator[None]:
    """The network's arithmetic for one solve: fp32 (TF32 off, cuDNN's default included), tf32
    (CUDA matmuls and convolutions in TF32) or bf16 (autocast); None: precision_for the device.
    V stays float64 throughout."""
    precision = precision_for(precision, device)
    cuda = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = cuda[0].allow_tf32, cuda[1].allow_tf32
    cuda[0].allow_tf32 = cuda[1].allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        cuda[0].allow_tf32, cuda[1].allow_tf32 = saved


def bits_per_dim(logp: torch.Tensor, dims: int, offset: float) -> torch.Tensor:
    """Negative log-likelihood in bits per dimension: -logp / (D ln 2) + offset; for an 8-bit
    image the offset is -log2(bin width) (P(bin) = p(x) bin^D), for a continuous latent 0."""
    return -logp / (dims * math.log(2)) + offset


def log_volume_growth(score_fn: ScoreFunction, x: torch.Tensor, settings: ScorerSettings,
                      progress: Callable[[int], None] | None = None,
                      keys: list[int] | None = None) -> VolumeResult:
    """Score a batch: x [B, C, H, W] in the model's data range (or its latent) -> VolumeResult,
    every field per image.

    An image's result depends only on the image, the model and `settings`: probes are a hash of
    the image's content (or of `keys`, one per image), and the adaptive solver (whose steps
    depend on everything it integrates) solves each image on its own. Fixed-grid solvers
    integrate the batch together.
    """
    with network_precision(settings.precision, x.device):
        if settings.adaptive:
            parts = []
            for i in range(x.shape[0]):
                parts.append(_solve(score_fn, x[i:i + 1], settings, None if keys is None else keys[i:i + 1]))
                if progress:
                    progress(1)
            nfe = torch.tensor([p.nfe for p in parts], dtype=torch.int64)
        else:
            parts = [_solve(score_fn, x, settings, keys)]
            nfe = torch.full((x.shape[0],), parts[0].nfe, dtype=torch.int64)
            if progress:
                progress(x.shape[0])

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)
    latent, V = cat("latent"), cat("V")
    se = {name: None if cat(name) is None else cat(name).sqrt() for name in ("var", "window_var")}
    prior = score_fn.schedule.prior_logp(latent)
    logp = prior + V
    nan = torch.full_like(V, float("nan"))  # no estimate (an adaptive solver's)
    profile = None if settings.adaptive else (parts[0].times, parts[0].profile)
    return VolumeResult(V, prior, logp, bits_per_dim(logp, x[0].numel(), score_fn.bits_offset), nfe, latent,
                        nan if se["var"] is None else se["var"], cat("window"),
                        nan if se["window_var"] is None else se["window_var"], profile)
