"""A logistic-regression classifier fitted on sklearn digits: checks that class-conditional samples
show the class that was asked for."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def fit_digits_classifier(seed: int = 0):
    """LogisticRegression on all 1797 digits, pixels scaled to [-1, 1] as fewstep's data."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    x = d.images.reshape(len(d.images), -1) / 8.0 - 1.0
    return LogisticRegression(max_iter=5000, random_state=seed).fit(x, d.target)


def class_accuracy(classifier, samples: Tensor, labels: Tensor) -> tuple[float, list[float]]:
    """Overall and per-class accuracy of ``classifier`` on (N, 1, 8, 8) samples in [-1, 1]."""
    x = samples.float().clamp(-1, 1).reshape(len(samples), -1).cpu().numpy()
    pred = classifier.predict(x)
    y = labels.cpu().numpy()
    per = [float(np.mean(pred[y == c] == c)) for c in range(10) if (y == c).any()]
    return float(np.mean(pred == y)), per


def sample_classes(denoiser, *, per_class: int, steps: int, guidance: float | None, solver: str = "ddim",
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """``per_class`` samples of every digit class, from fixed noise."""
    from ..solvers import make_solver, sample

    labels = torch.arange(10).repeat_interleave(per_class)
    x = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = sample(denoiser, make_solver(solver), x, denoiser.schedule.sampling_grid(steps), {"class_labels": labels},
                 guidance=guidance)
    return out, labels
