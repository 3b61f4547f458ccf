"""Noise sources for samplers: per-sample, counter-based, so a result never depends on batching.

A sampler asks for noise as `noise(kind, step, rows, like)`: the draw of meaning `kind` at respaced
`step` for the batch rows `rows`, shaped like `like`. The production source derives every draw from
(sample seed, kind, step) alone, so a sample's draws are the same whatever batch, order, worker or
retry it runs in. Tests pass a source that replays the reference's recorded draws instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

_MASK63 = (1 << 63) - 1


class NoiseSource(Protocol):
    def __call__(self, kind: str, step: int, rows: Sequence[int], like: Tensor) -> Tensor: ...


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of its parts (blake2b; stable across runs and machines)."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & _MASK63


def sample_seed(job_seed: int, sample_id: str) -> int:
    """The seed of one sample: a pure function of the job seed and the sample's id."""
    return derive_seed("sample", int(job_seed), sample_id)


def draw_seed(seed: int, kind: str, step: int) -> int:
    """The seed of one draw of one sample (counter-based: no generator state carried between draws)."""
    return derive_seed("draw", int(seed), kind, int(step))


class SeededNoise:
    """Standard normal draws, each seeded from (sample seed, kind, step), generated on `like`'s device.

    Draws are float32 whatever the model precision. CPU and CUDA generators differ, so a sample is
    reproducible per device type.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        return g

    def __call__(self, kind: str, step: int, rows: Sequence[int], like: Tensor) -> Tensor:
        g = self._generator(like.device)
        out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        for j, row in enumerate(rows):
            g.manual_seed(draw_seed(self.seeds[row], kind, step))
            out[j] = torch.randn(like.shape[1:], generator=g, device=like.device, dtype=torch.float32)
        return out
