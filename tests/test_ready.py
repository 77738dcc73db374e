"""score/ready.py and DiffusersScore.compile: the compiled network against the eager one (on the
CPU, through inductor), its fixed batch, and the batch and compile choices of a run."""
import pytest
import torch

from pipeline.score.models import CPU_BATCH, DiffusersScore, ModelSettings
from pipeline.score.ready import HEADROOM, power_of_two_batch, ready, use_compile, warm_up_settings
from pipeline.score.schedules import LinearVP
from pipeline.score.scoring import fresh_scores
from pipeline.score.volume import ScorerSettings
from tests.exact import tiny_unet

F32 = 2.0**-24
LAYERS = 40  # the float32 operations an element passes through in the tiny UNet, as tests/test_gpu.py counts them


@pytest.fixture(scope="module")
def pair():
    """The same tiny UNet eager and compiled at a fixed batch of 4, each scored once with and
    once without gradients (so both graphs exist)."""
    unet = tiny_unet(channels=3, size=16)
    eager = DiffusersScore(unet, LinearVP(1000, 1e-4, 0.02))
    compiled = DiffusersScore(unet, LinearVP(1000, 1e-4, 0.02))
    compiled.compile(4)
    return eager, compiled


class Loaded:
    """What fresh_scores needs of a LoadedModel: a pixel model (no encoder)."""

    def __init__(self, score_fn):
        self.score_fn, self.encoder = score_fn, None

    def prepare(self, x):
        return x


def test_compiled_scores_equal_eager_within_float32_rounding(pair):
    """Inductor fuses and reorders the float32 arithmetic of each layer, so each network output
    moves by float32 rounding: 2^-24 per operation over the ~40 layers an element passes. V sums
    NFE such terms: |dV| <= 40 * 2^-24 * NFE * |V| (tests/test_gpu.py's bound for CUDA against
    the CPU). The loss is a mean of squared residuals r = eps_hat - e: its change is at most
    2 |r| |d eps_hat| per element, bounded by 40 * 2^-24 * 4 * L with |eps_hat|, |e| of order one.
    Six images make a chunk of 4 and one of 2 padded to 4: the padding changes nothing."""
    eager, compiled = pair
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    settings = ScorerSettings()
    a, b = fresh_scores(Loaded(eager), x, settings), fresh_scores(Loaded(compiled), x, settings)
    for ra, rb in zip(a, b):
        assert ra["nfe"] == rb["nfe"] == 16
        for c in ("log_volume_growth", "window_volume_growth"):
            assert abs(ra[c] - rb[c]) <= LAYERS * F32 * ra["nfe"] * abs(ra[c]), c
        assert abs(ra["denoising_loss"] - rb["denoising_loss"]) <= LAYERS * F32 * 4 * ra["denoising_loss"]


def test_compiled_network_compiles_once_for_any_batch(pair):
    """Batches of 1, 3, 4 and 9 images all run the compiled graphs of 4 rows: no recompile."""
    _, compiled = pair
    settings = ScorerSettings(steps=1, loss_noises=1)
    fresh_scores(Loaded(compiled), torch.rand(4, 3, 16, 16) * 2 - 1, settings)  # both graphs exist
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 3, 4, 9):
            rows = fresh_scores(Loaded(compiled), torch.rand(n, 3, 16, 16) * 2 - 1, settings)
            assert len(rows) == n


def test_compile_refuses_an_empty_batch(pair):
    with pytest.raises(ValueError, match="rows must be at least 1"):
        pair[1].compile(0)


@pytest.mark.parametrize("per_image,fixed,free,cap,expected", [
    (100, 0, 1000 / HEADROOM, 512, 8),  # 10 fit: 8
    (100, 200, 1000 / HEADROOM, 512, 8),  # 8 fit exactly
    (100, 0, 1e9, 256, 256),  # the cap (a shard)
    (100, 0, 1e9, 300, 256),  # a power of two under the cap
    (1e12, 0, 1e9, 512, 1),  # nothing fits: one at a time
])
def test_power_of_two_batch(per_image, fixed, free, cap, expected):
    assert power_of_two_batch(per_image, fixed, free, cap) == expected


def test_compile_is_on_for_cuda_only_by_default():
    assert use_compile(ModelSettings(model="m")) is False
    assert use_compile(ModelSettings(model="m", device="cuda")) is True
    assert use_compile(ModelSettings(model="m", device="cuda", compile="off")) is False
    assert use_compile(ModelSettings(model="m", compile="on")) is True
    with pytest.raises(ValueError, match="compile"):
        ModelSettings(model="m", compile="yes")


def test_warm_up_calls_the_network_as_the_run_does():
    """One cheap step in the run's precision and divergence; an adaptive solver's warm-up holds
    its probes fixed (the only mode a fixed grid and dopri5 share)."""
    w = warm_up_settings(ScorerSettings(precision="bf16", divergence="gaussian", probes=2))
    assert (w.solver, w.steps, w.loss_noises, w.precision, w.divergence, w.probes) == ("euler", 1, 1, "bf16",
                                                                                         "gaussian", 2)
    assert warm_up_settings(ScorerSettings(solver="dopri5")).probe_mode == "fixed"
    assert warm_up_settings(ScorerSettings(loss_noises=0)).loss_noises == 0


def test_ready_on_the_cpu(pair, tmp_path):
    """On the CPU the batch defaults to CPU_BATCH (under the cap) and auto does not compile;
    --batch-size wins; --compile on compiles at the batch and builds the graphs once."""
    from dataclasses import dataclass

    @dataclass
    class Model(Loaded):
        score_fn: DiffusersScore
        encoder: None = None
        warmed: tuple | None = None
        channels: int = 3
        sample_size: tuple = (16, 16)
        data_range: tuple = (-1.0, 1.0)

    eager = DiffusersScore(pair[0].unet, LinearVP(1000, 1e-4, 0.02))
    model = Model(eager)
    assert ready(model, ModelSettings(model="m"), ScorerSettings()).batch_size == CPU_BATCH
    assert ready(model, ModelSettings(model="m"), ScorerSettings(), cap=10).batch_size == 10
    assert ready(model, ModelSettings(model="m", batch_size=3), ScorerSettings()).batch_size == 3
    assert eager.compiled is None and model.warmed is None
    ready(model, ModelSettings(model="m", batch_size=4, compile="on"), ScorerSettings())
    assert eager.rows == 4 and model.warmed == (4, "fp32")
