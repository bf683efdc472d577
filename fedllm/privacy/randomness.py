"""Where a client's secret randomness comes from: Poisson sampling and DP noise.

A release is private only if the server cannot reproduce its randomness. torch's CPU
generator keeps only the low 32 bits of a seed (``manual_seed``: MT19937 seeded with
``seed & 0xffffffff``), so a noise or sampling generator seeded from any seed can be found by
trying 2^32 seeds against a released update; the exact noise then comes out and the
guarantee is gone. Releases therefore draw from the operating system's CSPRNG (``os.urandom``)
directly: ``SecretRandomness``. ``SeededRandomness`` reproduces a run from a seed, for tests
and the in-process experiments only; nothing a client sends uses it.

Gaussian noise is Box-Muller on 53-bit uniforms, in float64, then cast (the floating-point
attack on textbook Gaussian samplers, Mironov 2012, is not addressed, as in Opacus without
its secure mode).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


class SecretRandomness:
    """Uniforms and Gaussians from the OS CSPRNG: nothing to seed, nothing to replay."""

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` independent uniforms on [0, 1) (float64, CPU)."""
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy(words.astype(np.float64) * 2.0 ** -53)

    def normal(self, shape, std: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """N(0, std^2) of ``shape`` (Box-Muller), on ``device``."""
        n = math.prod(shape)
        u1 = 1.0 - self.uniform(n)  # (0, 1]: log is finite
        u2 = self.uniform(n)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return (z * std).view(*shape).to(device=device, dtype=dtype)

    def seed(self) -> int:
        """A fresh 62-bit seed (e.g. for public random directions)."""
        return int.from_bytes(os.urandom(8), "little") >> 2


class SeededRandomness:
    """Reproducible from ``seed`` (torch generators, 32 bits effective): tests and the
    in-process experiments; never a client's release."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self._sampling = torch.Generator().manual_seed(seed)
        self._noise = torch.Generator(device=device).manual_seed(seed + 1)
        self._device = torch.device(device)
        self._seeds = np.random.default_rng(seed)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self._sampling, dtype=torch.float64)

    def normal(self, shape, std: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
        z = torch.normal(0.0, std, tuple(shape), generator=self._noise, device=self._device)
        return z.to(device=device or self._device, dtype=dtype)

    def seed(self) -> int:
        return int(self._seeds.integers(0, 2 ** 62))


def randomness(seed: int | None, device: torch.device | str = "cpu"):
    """``None``: the OS CSPRNG (what a client's release uses); an int: reproducible."""
    return SecretRandomness() if seed is None else SeededRandomness(seed, device)
