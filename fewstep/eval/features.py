"""The FID Inception as a feature extractor: images in [-1, 1] -> pool3 features in float64."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .preprocess import preprocess


def inception_extractor(net: nn.Module, mode: str = "clean") -> Callable[[Tensor], Tensor]:
    """images in [-1, 1] (N, C, H, W) -> pool3 features (N, 2048), with the chosen resizing."""
    device = next(net.parameters()).device

    @torch.no_grad()
    def extract(images: Tensor) -> Tensor:
        x = preprocess(images, mode).to(device) / 127.5 - 1.0
        return net(x).double().cpu()

    return extract

