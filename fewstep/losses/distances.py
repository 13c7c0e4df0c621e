"""Per-sample distances between a prediction and its target, shared by the regression-style losses."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError, check_choice, lookup


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


#: what a pair loss may compare with: the latent distances, or LPIPS on images
PAIR_DISTANCES = (*DISTANCES, "lpips")


class PairDistance:
    """d(x_hat, x1) per sample for the losses that regress onto teacher pairs: l2 or pseudo_huber (constant
    ``huber_c``), or LPIPS (Zhang et al. 2018, VGG; weights from ``lpips_weights``, see fewstep.lpips); with a
    ``decoder`` (the pipeline's VAE, differentiable) both sides are decoded to images first."""

    def __init__(self, distance: str = "l2", *, huber_c: float = 0.001, lpips_weights: str | None = None,
                 decode: bool = False, decoder: Callable[[Tensor], Tensor] | None = None) -> None:
        self.name = check_choice(distance, PAIR_DISTANCES, "distance")
        self.huber_c = huber_c
        self.lpips = None
        if distance == "lpips":
            from ..lpips import load_lpips

            self.lpips = load_lpips(lpips_weights)
        if decode and decoder is None:
            raise FewstepError("decode=true needs a latent model with a VAE (a pipeline student or teacher)")
        self.decoder = decoder if decode else None

    @staticmethod
    def check(distance: str = "l2", lpips_weights: str | None = None, **_: Any) -> None:
        """The LPIPS weights file exists (checked with the recipe, before any stage runs)."""
        if distance == "lpips":
            from ..lpips import check_weights

            check_weights(lpips_weights)

    def __call__(self, x_hat: Tensor, x1: Tensor) -> Tensor:
        if self.decoder is not None:
            x_hat = self.decoder(x_hat)
            with torch.no_grad():
                x1 = self.decoder(x1)
        if self.lpips is not None:
            return self.lpips.to(x1.device)(x_hat, x1)
        return DISTANCES[self.name](x_hat, x1, self.huber_c)
