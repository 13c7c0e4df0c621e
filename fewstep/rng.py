"""Per-sample randomness: each sample's noise comes from its own seed, so results do not depend on
batch size, gradient accumulation or the number of processes, and a resumed run redraws nothing."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for mixing (seed, position) into one 63-bit seed


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the sample at global ``position`` of a run seeded with ``seed``."""
    return ((seed * _MIX) ^ (position * 0xBF58476D1CE4E5B9) ^ (position >> 7)) & 0x7FFFFFFFFFFFFFFF



class SampleRNG:
    """One torch.Generator per sample; each draw stacks one draw per sample (on the CPU, then moved).

    Losses take every random number (noise, timesteps, guidance scales) from here, in a fixed order.
    """

    def __init__(self, seeds: Tensor | Sequence[int], device: torch.device | str = "cpu") -> None:
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)

    def rand(self, *shape: int) -> Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators]).to(self.device)

    def randint(self, low: int, high: int) -> Tensor:
        return torch.stack([torch.randint(low, high, (), generator=g) for g in self.generators]).to(self.device)

    def uniform(self, low: float, high: float) -> Tensor:
        return low + (high - low) * self.rand()
