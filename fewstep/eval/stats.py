"""Streaming feature statistics in float64, and the `.npz` layout pytorch-fid and clean-fid use."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from ..errors import FewstepError


class RunningStats:
    """Mean and covariance of feature batches, merged exactly (Chan et al. 1979) in float64."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros((dim, dim), dtype=np.float64)  # sum of outer products of deviations

    def update(self, features: Tensor | np.ndarray) -> None:
        x = features.detach().double().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise FewstepError(f"features must be (N, {len(self.mean)}), got {x.shape}")
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(0)
        d = x - mb
        m2b = d.T @ d
        delta = mb - self.mean
        total = self.n + nb
        self.m2 += m2b + np.outer(delta, delta) * (self.n * nb / total)
        self.mean += delta * (nb / total)
        self.n = total

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise FewstepError("a covariance needs at least 2 samples")
        return self.m2 / (self.n - 1)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **extra) -> Path:
    """Write ``mu`` and ``sigma`` (and any extra arrays, e.g. ``n``) to an .npz file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, **extra)
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with keys ``mu`` and ``sigma`` (pytorch-fid's and clean-fid's layout)."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"statistics file {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise FewstepError(f"{path} has no 'mu' and 'sigma' arrays (found: {', '.join(f.files)})")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
