"""Feature extraction in batches into float64 statistics (or a full feature matrix, for KID and PR)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .preprocess import preprocess
from .stats import RunningStats


def inception_extractor(net: nn.Module, mode: str = "clean") -> Callable[[Tensor], Tensor]:
    """images in [-1, 1] (N, C, H, W) -> pool3 features (N, 2048), with the chosen resizing."""
    device = next(net.parameters()).device

    @torch.no_grad()
    def extract(images: Tensor) -> Tensor:
        x = preprocess(images, mode).to(device) / 127.5 - 1.0
        return net(x).double().cpu()

    return extract


def collect(extract: Callable[[Tensor], Tensor], batches: Iterable[Tensor], *, keep: bool = True) -> tuple[RunningStats, Tensor | None]:
    """Run ``extract`` over image batches; return the running statistics and (optionally) all features."""
    stats, kept = None, []
    for images in batches:
        f = extract(images)
        if stats is None:
            stats = RunningStats(f.shape[1])
        stats.update(f)
        if keep:
            kept.append(f)
    if stats is None:
        raise ValueError("no batches to extract features from")
    return stats, (torch.cat(kept) if keep else None)
