"""Hutchinson probes: the right moments, reproducible, free of batch, order and device."""
import math

import pytest
import torch

from pipeline.score.probes import ProbeStream, mix32, splitmix64


def test_mix32_is_a_bijection_without_overflow():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65537  # spread over [0, 2^32)
    y = mix32(x)
    assert int(y.min()) >= 0 and int(y.max()) < 2**32
    assert len(torch.unique(y)) == len(x)
    # against a plain Python reference of lowbias32
    def ref(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)
    assert [ref(int(v)) for v in x[:1000]] == y[:1000].tolist()
    # the reference generator (Vigna's splitmix64.c: state += golden gamma, then this finaliser)
    # seeded with 0 gives 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, 0x06c45d188009454f
    gamma = 0x9E3779B97F4A7C15
    assert [splitmix64(k * gamma % 2**64) for k in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                               0x06C45D188009454F]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_probe_moments(kind):
    """E[v] = 0 and E[v v^T] = I: over n = K B D draws the mean is within 4 / sqrt(n) of 0 and the
    second moments within 4 sd of theirs (Rademacher: v^2 = 1 exactly; Gaussian: Var v^2 = 2)."""
    x = torch.rand(8, 3, 8, 8)
    v = ProbeStream(x, 0, 16, kind, fresh=True)(5)  # [16, 8, 3, 8, 8]
    assert v.shape == (16, 8, 3, 8, 8) and v.dtype == torch.float64
    n = v.numel()
    assert abs(float(v.mean())) < 4 / math.sqrt(n)
    if kind == "rademacher":
        assert set(v.unique().tolist()) == {-1.0, 1.0}
    else:
        assert abs(float((v**2).mean()) - 1) < 4 * math.sqrt(2 / n)
    flat = v.flatten(2)  # off-diagonal second moments, one per pair of neighbouring entries
    cross = (flat[..., 1:] * flat[..., :-1]).mean()
    assert abs(float(cross)) < 4 / math.sqrt(flat[..., 1:].numel())


def test_fresh_probes_change_with_the_evaluation_and_fixed_ones_do_not():
    x = torch.rand(2, 1, 8, 8)
    fresh, fixed = ProbeStream(x, 0, 1, "rademacher", True), ProbeStream(x, 0, 1, "rademacher", False)
    assert not torch.equal(fresh(0), fresh(1))
    assert torch.equal(fresh(3), ProbeStream(x, 0, 1, "rademacher", True)(3))
    assert torch.equal(fixed(0), fixed(7)) and torch.equal(fixed(0), fresh(0))
    # agreement between two evaluations' probes is that of independent signs: 1/2 +- 4 sd
    agree = float((fresh(0) == fresh(1)).double().mean())
    assert abs(agree - 0.5) < 4 * 0.5 / math.sqrt(x.numel())


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_planned_probes_are_the_same(kind):
    """plan(n) makes every evaluation's stream keys in one copy to the device; the probes are
    those made one evaluation at a time, bit for bit, and past the plan they are made as before."""
    x = torch.rand(3, 2, 4, 4)
    planned, single = ProbeStream(x, 1, 3, kind, True), ProbeStream(x, 1, 3, kind, True)
    planned.plan(4)
    for k in range(6):
        assert torch.equal(planned(k), single(k))


def test_probes_depend_on_seed_and_content_only():
    x = torch.rand(4, 1, 8, 8)
    whole = ProbeStream(x, 3, 2, "gaussian", True)(2)
    for i in range(4):
        alone = ProbeStream(x[i:i + 1], 3, 2, "gaussian", True)(2)
        assert torch.equal(alone[:, 0], whole[:, i])
    flipped = ProbeStream(x.flip(0), 3, 2, "gaussian", True)(2)
    assert torch.equal(flipped.flip(1), whole)
    assert not torch.equal(ProbeStream(x, 4, 2, "gaussian", True)(2), whole)
    same_image = ProbeStream(torch.stack([x[0], x[0]]), 3, 1, "rademacher", True)(0)
    assert torch.equal(same_image[0, 0], same_image[0, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_probes_are_the_same_on_cuda():
    x = torch.rand(3, 3, 16, 16)
    for kind in ("rademacher", "gaussian"):
        cpu = ProbeStream(x, 0, 2, kind, True)(4)
        gpu = ProbeStream(x.cuda(), 0, 2, kind, True)(4)
        assert gpu.device.type == "cuda"
        assert torch.allclose(cpu, gpu.cpu(), rtol=1e-12, atol=1e-12)
