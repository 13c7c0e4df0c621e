"""Gaussian mixtures: toy data whose exact denoiser is closed-form (see denoisers/mixture.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FewstepError, lookup


@dataclass
class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, Sigma_k). Tensors are float64: weights (K,), means (K, D), covs (K, D, D).

    ``labels`` (K,) optionally assigns each component a class, for class-conditional data.
    """

    weights: Tensor
    means: Tensor
    covs: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.covs = torch.as_tensor(self.covs, dtype=torch.float64)
        K, D = self.means.shape
        if self.weights.shape != (K,) or self.covs.shape != (K, D, D):
            raise FewstepError(f"mixture shapes disagree: weights {tuple(self.weights.shape)}, means {(K, D)}, covs {tuple(self.covs.shape)}")
        if (self.weights < 0).any() or abs(float(self.weights.sum()) - 1) > 1e-9:
            raise FewstepError("mixture weights must be non-negative and sum to 1")
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.long)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def sample(self, n: int, generator: torch.Generator | None = None, *, return_components: bool = False):
        """n float32 samples (and their component indices when asked)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = (self.means[k] + torch.einsum("nij,nj->ni", chol[k], z)).float()
        return (x, k) if return_components else x


def ring(num_modes: int = 8, radius: float = 4.0, std: float = 0.3, weights: Tensor | None = None) -> GaussianMixture:
    """Modes at radius ``radius`` and angles 2 pi k / num_modes, isotropic ``std``; equal weights by default."""
    angles = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(num_modes, 2, 2).clone()
    w = torch.full((num_modes,), 1.0 / num_modes, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return GaussianMixture(w / w.sum(), means, covs, labels=torch.arange(num_modes))


def reference_ring() -> GaussianMixture:
    """The reference mixture: 8 equal modes at radius 4, std 0.3."""
    return ring()


def imbalanced_ring(ratio: float = 16.0) -> GaussianMixture:
    """The reference ring with geometric mode weights spanning ``ratio`` (16x: 1.486^k)."""
    w = ratio ** (torch.arange(8, dtype=torch.float64) / 7)
    return ring(weights=w)


def random_mixture(dim: int, num_modes: int = 8, *, seed: int = 0, scale: float = 3.0) -> GaussianMixture:
    """An N-D mixture with random means, random full covariances and random weights (seeded)."""
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(num_modes, dim, dtype=torch.float64, generator=g)
    a = 0.3 * torch.randn(num_modes, dim, dim, dtype=torch.float64, generator=g)
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(dim, dtype=torch.float64)
    w = torch.rand(num_modes, dtype=torch.float64, generator=g) + 0.2
    return GaussianMixture(w / w.sum(), means, covs, labels=torch.arange(num_modes))


MIXTURES = {"ring": reference_ring, "imbalanced_ring": imbalanced_ring}


def make_mixture(name: str, **kwargs) -> GaussianMixture:
    """A named mixture: ring, imbalanced_ring, or random (with dim=...)."""
    if name == "random":
        return random_mixture(**kwargs)
    return lookup({**MIXTURES, "random": random_mixture}, name, "mixture")(**kwargs)
