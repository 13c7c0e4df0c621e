"""The base of the losses that regress a student's output onto teacher pairs (z, x1, c): flow_distill (k Euler
steps of a flow) and ode_regression (one VP step at a conditioning timestep). They differ only in x_hat(z, c)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError, check_choice
from .base import DistillationLoss, Models
from .distances import DISTANCES

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


class PairLoss(DistillationLoss):
    """Holds the ``PairDistance`` of the keyword arguments ``distance``, ``huber_c``, ``lpips_weights``, ``decode``;
    the pipeline's VAE decoder comes from ``from_models``."""

    choices = {"distance": PAIR_DISTANCES}
    needs = {"x0": " (teacher pairs: data.name pairs)", "noise": ""}
    provided = ("decoder",)

    def __init__(self, *, distance: str = "l2", huber_c: float = 0.001, lpips_weights: str | None = None,
                 decode: bool = False, decoder: Any = None) -> None:
        super().__init__()
        self.distance = PairDistance(distance, huber_c=huber_c, lpips_weights=lpips_weights, decode=decode,
                                     decoder=decoder)

    @classmethod
    def check(cls, **kwargs: Any) -> None:
        PairDistance.check(**kwargs)

    @classmethod
    def from_models(cls, models: Models, **settings: Any) -> "PairLoss":
        return cls(decoder=models.pipeline.decode_latents if models.pipeline is not None else None, **settings)
