"""Per-sample randomness: each sample's noise comes from its own seed, so results do not depend on
batch size, accumulation or process count."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def randn_per_sample(shape: Sequence[int], seeds: Sequence[int], *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """A (len(seeds), *shape) tensor whose i-th slice is torch.randn(shape) from Generator(seed_i)."""
    out = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(out).to(device)
