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


def test_a_cosine_schedule_scores_on_cuda():
    """A schedule interpolated from a table (cosine here; trained betas alike) keeps its table on
    the time's device: on CUDA V equals the CPU's within the float32 bound above (before
    2026-12-08 the table stayed on the host, where torch.searchsorted refuses a device's time)."""
    from diffusers import DDPMScheduler

    from pipeline.score.schedules import schedule_from_scheduler

    schedule = schedule_from_scheduler(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    cpu = DiffusersScore(tiny_unet(channels=3, size=16), schedule)
    gpu = DiffusersScore(tiny_unet(channels=3, size=16).cuda(), schedule)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    settings = ScorerSettings(solver="heun", steps=8)
    a = log_volume_growth(cpu, x, settings)
    b = log_volume_growth(gpu, x.cuda(), settings)
    bound = 40 * F32 * int(a.nfe[0]) * float(a.log_volume_growth.abs().max())
    assert torch.allclose(a.log_volume_growth, b.log_volume_growth.cpu(), rtol=0, atol=bound)


def test_a_batch_waits_on_the_device_once(scores):
    """V's fixed-grid solve and the loss of a batch whose keys are given wait on the device once:
    where odeint moves the grid there (a plain copy from the host). What else they copy there
    goes from pinned memory without waiting, and nothing is read back (tests/test_volume.py, on
    the meta device). torch.cuda.set_sync_debug_mode reports each wait."""
    import warnings

    from pipeline.score.loss import denoising_loss

    _, gpu = scores
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).cuda()
    settings = ScorerSettings(solver="heun", steps=8)
    keys = [1, 2, 3, 4]
    log_volume_growth(gpu, x, settings, keys=keys)  # warm-up: cuDNN, the allocators
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            log_volume_growth(gpu, x, settings, keys=keys)
            denoising_loss(gpu, x, 0.1, 4, keys=keys)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) <= 1, waits


def test_faiss_gpu_search_equals_cpu_search():
    """With faiss-gpu (`make gpu`) the flat index moves to the GPU and finds what the CPU index
    finds: the same neighbours, and inner products of unit vectors that differ by float32
    rounding of a d-term dot product, d * 2^-24 (each product and sum rounds once)."""
    import numpy as np

    pytest.importorskip("faiss", reason="FAISS is not installed here")
    from pipeline.decide import index

    if not index.gpu_faiss_available():
        pytest.skip("this FAISS build has no GPU support (make gpu installs faiss-gpu)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cpu, gpu = index.build_index(x), index.build_index(x, device="cuda")
    assert index.on_gpu(gpu) and not index.on_gpu(cpu)
    d_cpu, i_cpu = cpu.search(x[:50], 5)
    d_gpu, i_gpu = gpu.search(x[:50], 5)
    assert (i_cpu[:, 0] == np.arange(50)).all() and (i_gpu[:, 0] == np.arange(50)).all()
    assert np.allclose(d_cpu, d_gpu, rtol=0, atol=64 * F32)


def test_compiled_network_on_cuda_equals_eager(scores):
    """torch.compile on CUDA (inductor's Triton kernels) reorders float32 arithmetic as on the CPU:
    the same bound as CUDA against the CPU above, 40 * 2^-24 * NFE * |V|; five images through a
    compiled batch of 4 (one chunk padded)."""
    from pipeline.score.scoring import fresh_scores
    from tests.test_ready import Loaded

    _, gpu = scores
    x = (torch.rand(5, 3, 16, 16) * 2 - 1).cuda()
    eager = fresh_scores(Loaded(gpu), x, ScorerSettings())
    compiled = DiffusersScore(gpu.unet, gpu.schedule)
    compiled.compile(4)
    fast = fresh_scores(Loaded(compiled), x, ScorerSettings())
    for a, b in zip(eager, fast):
        assert abs(a["log_volume_growth"] - b["log_volume_growth"]) <= 40 * F32 * a["nfe"] * abs(a["log_volume_growth"])
        assert abs(a["denoising_loss"] - b["denoising_loss"]) <= 40 * F32 * 4 * a["denoising_loss"]


def test_auto_batch_fits_the_device(scores, tmp_path):
    """On CUDA --batch-size defaults to a power of two under the cap, measured from the device's
    free memory; a second call at that batch reuses it."""
    from pipeline.score.models import ModelSettings
    from pipeline.score.ready import ready
    from tests.test_ready import Loaded

    _, gpu = scores
    model = Loaded(gpu)
    model.warmed, model.channels, model.sample_size, model.data_range = None, 3, (16, 16), (-1.0, 1.0)
    s = ready(model, ModelSettings(model="m", device="cuda", compile="off"), ScorerSettings(), cap=256)
    assert 1 <= s.batch_size <= 256 and s.batch_size & (s.batch_size - 1) == 0
    assert s.batch_size == 256  # a 16x16 tiny UNet: a few MB an image, far under an H200-class device
