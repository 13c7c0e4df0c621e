"""Sliced Wasserstein-2 distance, fewstep's one definition for vector data.

SW2(a, b) = sqrt( mean over D fixed random unit directions theta of
                  mean_i (sort(a theta)_i - sort(b theta)_i)^2 ),
with D = 256 directions drawn from a fixed seed (0) and equal sample counts (50,000 in reports).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FewstepError


def directions(dim: int, num: int = 256, seed: int = 0) -> Tensor:
    """``num`` unit vectors in R^dim from a fixed seed (float64)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(num, dim, dtype=torch.float64, generator=g)
    return d / d.norm(dim=1, keepdim=True)


def sliced_wasserstein2(a: Tensor, b: Tensor, *, num_directions: int = 256, seed: int = 0) -> float:
    """SW2 between two equally sized sample sets (N, D), computed in float64."""
    if a.ndim != 2 or a.shape != b.shape:
        raise FewstepError(f"SW2 needs two (N, D) sets of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = directions(a.shape[1], num_directions, seed)
    pa = torch.sort(theta @ a.double().T, dim=1).values  # (directions, N): sort along contiguous memory
    pb = torch.sort(theta @ b.double().T, dim=1).values
    return float(((pa - pb) ** 2).mean().sqrt())
