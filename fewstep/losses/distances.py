"""Per-sample distances between a prediction and its target, shared by the regression-style losses."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import lookup


def l2(a: Tensor, b: Tensor, c: float = 0.0) -> Tensor:
    """Mean squared error per sample."""
    return ((a.float() - b.float()) ** 2).flatten(1).mean(1)


def pseudo_huber(a: Tensor, b: Tensor, c: float = 0.001) -> Tensor:
    """sqrt(d^2 + c^2) - c elementwise, averaged per sample (diffusers' LCM scripts; Song & Dhariwal 2023
    apply it to the per-sample norm instead)."""
    d = a.float() - b.float()
    return (torch.sqrt(d**2 + c**2) - c).flatten(1).mean(1)


DISTANCES: dict[str, Callable[..., Tensor]] = {"l2": l2, "pseudo_huber": pseudo_huber}


def distance(name: str) -> Callable[..., Tensor]:
    """A per-sample distance by name (l2, pseudo_huber; lpips is built by the losses that offer it)."""
    return lookup(DISTANCES, name, "distance")

