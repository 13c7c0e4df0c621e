"""The digits feature network: a small CNN classifier on 8x8 digits whose 64-d penultimate layer
gives the features of the digits Fréchet distance (the embedded stand-in for Inception pool3).

It is trained by fewstep's own loop (recipes/digits_features.yaml, loss ``classifier``) and ships
in fewstep/assets/ with the reference statistics of all 1797 sklearn digits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ..errors import FewstepError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
NET_DIR = ASSETS / "digits_features"
STATS_FILE = ASSETS / "digits_stats.npz"


class DigitsFeatureNet(ModelMixin, ConfigMixin):
    """conv(in_channels->c) -> conv(c->2c, stride 2) -> conv(2c->2c) -> linear(feature_dim) -> linear(num_classes).
    Also the shapes feature network (``in_channels`` 3, fewstep/assets/shapes_features)."""

    @register_to_config
    def __init__(self, channels: int = 32, feature_dim: int = 64, num_classes: int = 10, resolution: int = 8,
                 in_channels: int = 1):
        super().__init__()
        c = channels
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.SiLU(),
        )
        side = (resolution + 1) // 2
        self.to_features = nn.Linear(2 * c * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) in [-1, 1] -> (N, feature_dim); other sizes are resized to the training resolution."""
        r = self.config.resolution
        if x.shape[-1] != r or x.shape[-2] != r:
            x = F.interpolate(x.float(), size=(r, r), mode="bilinear", align_corners=False)
        return F.silu(self.to_features(self.convs(x.float()).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_digits_net(directory: str | Path | None = None, recipe: str = "digits_features") -> DigitsFeatureNet:
    """A feature network from ``directory`` (default the shipped digits one); ``recipe`` trains it."""
    path = Path(directory) if directory is not None else NET_DIR
    if not (path / "config.json").is_file():
        raise FewstepError(f"feature network not found in {path}; train it with `fewstep distill {recipe}`")
    return DigitsFeatureNet.from_pretrained(path).eval()


@torch.no_grad()
def digits_features(net: DigitsFeatureNet, images: Tensor, batch: int = 1024) -> Tensor:
    """Features of ``images`` (on any device) computed where ``net`` is, returned on the host in float64."""
    device = next(net.parameters()).device
    return torch.cat([net.features(images[i:i + batch].to(device)).double().cpu() for i in range(0, len(images), batch)])


def digits_reference_stats(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    from .stats import load_stats

    return load_stats(path or STATS_FILE)


def digits_fd(images: Tensor, net: DigitsFeatureNet | None = None, reference: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Fréchet distance between the digits features of ``images`` and those of all sklearn digits."""
    from .distances import frechet_distance
    from .stats import RunningStats

    net = net or load_digits_net()
    mu_r, sigma_r = reference or digits_reference_stats()
    stats = RunningStats(net.config.feature_dim)
    stats.update(digits_features(net, images))
    return frechet_distance(stats.mean, stats.cov, mu_r, sigma_r)
