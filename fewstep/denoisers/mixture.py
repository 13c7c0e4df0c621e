"""The analytic teacher: the exact denoiser E[x0 | x_t] of a Gaussian mixture under any schedule."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data.mixtures import GaussianMixture
from ..schedules import Schedule
from .base import Cond, Denoiser


class MixtureDenoiser(Denoiser):
    """Exact posterior mean for p(x0) = sum_k w_k N(mu_k, Sigma_k) and x_t = alpha x0 + sigma eps.

    Given component k, x_t ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I) and
    E[x0 | x_t, k] = mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k);
    the responsibilities p(k | x_t) weight these. Computed in float64 in each component's
    eigenbasis (Sigma_k = U diag(lambda) U^T). ``class_labels`` restricts to the components of that
    class; the null class (= num_classes) keeps all of them, so guidance works as for a network.
    """

    cond_keys = ("class_labels",)

    def __init__(self, mixture: GaussianMixture, schedule: Schedule) -> None:
        null = {"class_labels": torch.tensor([mixture.num_classes])} if mixture.num_classes else None
        super().__init__(schedule, "sample", null_cond=null)
        self.mixture = mixture
        lam, U = torch.linalg.eigh(mixture.covs)
        self.register_buffer("lam", lam.clamp_min(0), persistent=False)
        self.register_buffer("U", U, persistent=False)
        self.register_buffer("means", mixture.means.clone(), persistent=False)
        self.register_buffer("log_w", mixture.weights.clamp_min(1e-300).log(), persistent=False)
        labels = mixture.labels if mixture.labels is not None else torch.zeros(len(mixture.weights), dtype=torch.long)
        self.register_buffer("labels", labels, persistent=False)

    def network_output(self, x_t: Tensor, t: Tensor, cond: Cond | None, timestep_cond: Tensor | None) -> Tensor:
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1).double()
        alpha, sigma = self.schedule.alpha_sigma(t.double())
        a, s2 = alpha[:, None, None], (sigma**2)[:, None, None]  # (B, 1, 1)
        var = a * a * self.lam[None] + s2  # (B, K, D) variances in each eigenbasis
        z = torch.einsum("kdj,bkd->bkj", self.U, x[:, None, :] - a * self.means[None])  # (B, K, D)
        logp = self.log_w[None] - 0.5 * (z * z / var).sum(-1) - 0.5 * var.log().sum(-1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
        labels = (cond or {}).get("class_labels")
        if labels is not None:
            keep = (self.labels[None] == labels.to(x.device).long()[:, None]) | (labels.long()[:, None] == self.mixture.num_classes)
            logp = logp.masked_fill(~keep, float("-inf"))
        resp = torch.softmax(logp, dim=1)  # (B, K)
        post = self.means[None] + torch.einsum("kdj,bkj->bkd", self.U, a * self.lam[None] / var * z)  # (B, K, D)
        x0 = (resp[..., None] * post).sum(1)
        x0 = torch.where((sigma == 0)[:, None], x, x0)
        return x0.reshape(shape).to(torch.float32)
