"""Distances between feature sets: Fréchet distance, KID, precision/recall, density/coverage.

- Fréchet distance (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
  Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
  PSD matrix S1^(1/2) S2 S1^(1/2), all by symmetric eigendecompositions in float64. This is
  correct for rank-deficient covariances (N < d), where scipy's sqrtm can return complex noise.
- KID (Bińkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged
  over seeded random subsets.
- Precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) from k-NN
  balls in feature space.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import FewstepError


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise FewstepError(f"statistics shapes disagree: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 between two sets with the cubic polynomial kernel (float64)."""
    x, y = x.double(), y.double()
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of unbiased MMD^2 over ``subsets`` seeded random subsets of both sets."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise FewstepError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        i = torch.randperm(len(real), generator=g)[:size]
        j = torch.randperm(len(fake), generator=g)[:size]
        values.append(mmd2_unbiased(real[i], fake[j]))
    v = np.array(values)
    return float(v.mean()), float(v.std())


def _knn_radii(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    radii = []
    for s in range(0, len(x), chunk):
        d = torch.cdist(x[s:s + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k+1: the point itself is at distance 0
    return torch.cat(radii)


def _count_in_balls(query: Tensor, centers: Tensor, radii: Tensor, chunk: int = 2048) -> Tensor:
    counts = []
    for s in range(0, len(query), chunk):
        counts.append((torch.cdist(query[s:s + chunk], centers) <= radii[None]).sum(1))
    return torch.cat(counts)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    precision = (_count_in_balls(fake, real, r_real) > 0).double().mean().item()
    recall = (_count_in_balls(real, fake, r_fake) > 0).double().mean().item()
    return precision, recall


def density_coverage(real: Tensor, fake: Tensor, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020)."""
    real, fake = real.double(), fake.double()
    r_real = _knn_radii(real, k)
    density = _count_in_balls(fake, real, r_real).double().sum().item() / (k * len(fake))
    nearest_fake = torch.cat([torch.cdist(real[s:s + 2048], fake).min(1).values for s in range(0, len(real), 2048)])
    coverage = (nearest_fake <= r_real).double().mean().item()
    return density, coverage
