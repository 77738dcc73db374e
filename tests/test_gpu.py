"""Scoring on CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs these on one)."""
import pytest
import torch

from pipeline.score.models import DiffusersScore
from pipeline.score.schedules import LinearVP
from pipeline.score.volume import ScorerSettings, log_volume_growth
from tests.exact import tiny_unet

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

F32 = 2.0**-24


@pytest.fixture(scope="module")
def scores():
    unet = tiny_unet(channels=3, size=16)
    cpu = DiffusersScore(unet, LinearVP(1000, 1e-4, 0.02))
    gpu = DiffusersScore(tiny_unet(channels=3, size=16).cuda(), LinearVP(1000, 1e-4, 0.02))
    return cpu, gpu


def test_cuda_scores_equal_cpu_scores(scores):
    """The probes are the same on both devices (a hash, not a device RNG) and TF32 is off in fp32:
    V differs only by float32 rounding in the network, 2^-24 per operation over its ~40 layers,
    carried through the NFE-term sum of V: |dV| <= 40 * 2^-24 * NFE * |V| (a 100x margin over
    the typical error)."""
    cpu, gpu = scores
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    settings = ScorerSettings(solver="heun", steps=8)
    a = log_volume_growth(cpu, x, settings)
    b = log_volume_growth(gpu, x.cuda(), settings)
    assert b.log_volume_growth.device.type == "cuda"
    bound = 40 * F32 * int(a.nfe[0]) * float(a.log_volume_growth.abs().max())
    assert torch.allclose(a.log_volume_growth, b.log_volume_growth.cpu(), rtol=0, atol=bound)


@pytest.mark.parametrize("precision,unit", [("tf32", 2.0**-11), ("bf16", 2.0**-8)])
def test_lower_precision_stays_within_its_rounding(scores, precision, unit):
    """TF32 and bf16 keep 10 and 7 mantissa bits: V moves by at most their unit roundoff times
    the same 40 layers and NFE terms."""
    _, gpu = scores
    x = (torch.rand(6, 3, 16, 16) * 2 - 1).cuda()
    settings = ScorerSettings(solver="heun", steps=8)
    ref = log_volume_growth(gpu, x, settings).log_volume_growth
    low = log_volume_growth(gpu, x, ScorerSettings(solver="heun", steps=8, precision=precision)).log_volume_growth
    assert torch.isfinite(low).all()
    assert torch.allclose(low, ref, rtol=0, atol=40 * unit * 16 * float(ref.abs().max()))
