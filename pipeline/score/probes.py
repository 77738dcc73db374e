"""Hutchinson-Skilling probes from a counter-based hash: reproducible, batch- and order-free,
and the same on every device.

Entry d of probe j at drift evaluation k for an image is a pure function of (seed, the image's
content, k, j, d): a 64-bit key per image (sha256 of the seed and the image's float32 bytes),
split into two 32-bit stream keys per (k, j) by splitmix64, and hashed with the element index by
Wellons' lowbias32 mixer in int64 tensor arithmetic. So an image gets the same probes in any
batch, in any order, on CPU or GPU, and `fresh` probes (a new one at every drift evaluation)
cost no more than fixed ones.
"""
from __future__ import annotations

import hashlib
import math

import torch

KINDS = ("rademacher", "gaussian")
MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """One step of Steele et al.'s SplitMix64 finaliser on a Python int (a bijection of 64 bits)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x m) mod 2^32 for int64 x in [0, 2^32), in 16-bit halves so that nothing overflows int64."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a bijection of [0, 2^32) with near-ideal avalanche: int64 -> int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def image_key(seed: int, image: torch.Tensor) -> int:
    """A 64-bit key from (seed, the image's float32 content): [C, H, W] -> int."""
    return image_keys(seed, image[None])[0]


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU it goes from pinned memory without waiting: a copy
    from ordinary host memory waits for everything queued on the device before it (a
    synchronisation); the pinned block is not reused until the copy has run."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


KEY_CHUNK = 16  # images copied to the host at a time: few synchronisations, bounded host memory


def image_keys(seed: int, x: torch.Tensor) -> list[int]:
    """image_key of every image of a batch [B, C, H, W], copied to the host KEY_CHUNK images at
    a time (not one by one: on a GPU each copy is a device synchronisation)."""
    out = []
    for start in range(0, x.shape[0], KEY_CHUNK):
        for row in x[start:start + KEY_CHUNK].detach().to("cpu", torch.float32).contiguous().numpy():
            h = hashlib.sha256(f"memclean-probe:{seed}:".encode())
            h.update(row.tobytes())
            out.append(int.from_bytes(h.digest()[:8], "little"))
    return out


class ProbeStream:
    """Probes v [K, B, ...] float64 with E[v v^T] = I for drift evaluation k of a batch x.

    fresh: a new set at every evaluation (fixed grids: the trajectory never reads V, so the
    quadrature stays unbiased and the probe noise averages over the evaluations);
    fixed: one set for the whole solve (adaptive solvers need a deterministic right-hand side).
    """

    def __init__(self, x: torch.Tensor, seed: int, probes: int, kind: str, fresh: bool,
                 keys: list[int] | None = None):
        if kind not in KINDS:
            raise ValueError(f"probe kind {kind!r} is not one of {KINDS}")
        # one per image: given (a latent's image, whose hash does not depend on the encoder's
        # float rounding in a batch), or the hash of x itself
        self.keys = list(keys) if keys is not None else image_keys(seed, x)
        self.K, self.kind, self.fresh = probes, kind, fresh
        self.shape, self.device = tuple(x.shape[1:]), x.device
        self.D = math.prod(self.shape)
        self._fixed: torch.Tensor | None = None
        self._planned: torch.Tensor | None = None  # plan(): every evaluation's stream keys

    def plan(self, evaluations: int) -> None:
        """Make the stream keys of evaluations 0 .. evaluations - 1 at once, in one copy to the
        images' device: on a GPU each copy from the host waits for the device, and a fresh
        probe set at every evaluation made one copy an evaluation."""
        if self.fresh:
            self._planned = to_device(torch.tensor([self._stream_key_rows(k) for k in range(evaluations)],
                                                   dtype=torch.int64), self.device)

    def __call__(self, k: int) -> torch.Tensor:
        """The probes of evaluation k: [K, B, ...] float64 on the images' device."""
        if not self.fresh:
            if self._fixed is None:
                self._fixed = self._draw(0)
            return self._fixed
        return self._draw(k)

    def _stream_key_rows(self, k: int) -> list:
        """Two 32-bit keys per (probe, image) for evaluation k, as lists: [K][2][B]."""
        keys = []
        for j in range(self.K):
            counter = splitmix64((k << 20) + j)
            row = [splitmix64(key ^ counter) for key in self.keys]
            keys.append([[r & MASK32 for r in row], [r >> 32 for r in row]])
        return keys

    def _stream_keys(self, k: int) -> torch.Tensor:
        """Two 32-bit keys per (probe, image) for evaluation k: [2, K, B, 1] int64."""
        if self._planned is not None and k < len(self._planned):
            keys = self._planned[k]
        else:
            keys = to_device(torch.tensor(self._stream_key_rows(k), dtype=torch.int64), self.device)
        return keys.permute(1, 0, 2)[..., None]

    def _bits(self, k: int, n: int) -> torch.Tensor:
        """n hashed 32-bit words per (probe, image): [K, B, n] int64 in [0, 2^32)."""
        s = self._stream_keys(k)
        d = torch.arange(n, dtype=torch.int64, device=self.device)
        return mix32(mix32(d ^ s[0]) ^ s[1])

    def _draw(self, k: int) -> torch.Tensor:
        B = len(self.keys)
        if self.kind == "rademacher":
            v = 1.0 - 2.0 * (self._bits(k, self.D) >> 31).to(torch.float64)
        else:  # Box-Muller from two uniforms in (0, 1)
            u = (self._bits(k, 2 * self.D).to(torch.float64) + 0.5) / 2.0**32
            v = torch.sqrt(-2 * torch.log(u[..., :self.D])) * torch.cos(2 * math.pi * u[..., self.D:])
        return v.view(self.K, B, *self.shape)
