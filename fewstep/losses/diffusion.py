"""Ordinary denoising training (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022; flow matching,
Lipman et al. 2023): it trains teachers, and proves the loop."""
from __future__ import annotations

import torch

from ..denoisers import Denoiser
from ..errors import FewstepError, check_choice
from ..rng import SampleRNG
from ..schedules import expand_as
from .base import DistillationLoss, LossOutput

WEIGHTINGS = ("none", "min_snr")


class DiffusionLoss(DistillationLoss):
    """E ||native(x_t, t, c) - target(x0, eps, t)||^2 with the student's own parameterization.

    Args:
        cond_drop_prob: probability of replacing a sample's condition by the null condition, so the
            model also learns the unconditional prediction used by classifier-free guidance.
        t_min, t_max: timestep range (fewstep time); default the schedule's whole range.
        weighting: "none", or "min_snr" (Hang et al. 2023, gamma = ``snr_gamma``; VP only).
    """

    def __init__(self, *, cond_drop_prob: float = 0.0, t_min: float | None = None, t_max: float | None = None,
                 weighting: str = "none", snr_gamma: float = 5.0) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise FewstepError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.cond_drop_prob = cond_drop_prob
        self.t_min, self.t_max = t_min, t_max
        self.weighting = check_choice(weighting, WEIGHTINGS, "weighting")
        self.snr_gamma = snr_gamma

    def _timesteps(self, rng: SampleRNG, student: Denoiser) -> torch.Tensor:
        sch = student.schedule
        lo = 0.0 if self.t_min is None else self.t_min
        if sch.kind == "vp":
            hi = sch.num_train_timesteps - 1 if self.t_max is None else self.t_max
            return rng.randint(int(lo), int(hi) + 1).double()
        hi = float(sch.num_train_timesteps) if self.t_max is None else self.t_max
        return rng.uniform(lo, hi).double()

    def forward(self, phase, batch, student, teacher):
        x0 = batch["x0"].float()
        rng = SampleRNG(batch["seeds"], x0.device)
        eps = rng.randn(*x0.shape[1:])
        t = self._timesteps(rng, student)
        drop = rng.rand() < self.cond_drop_prob
        cond = student.batch_cond(batch)
        if cond and self.cond_drop_prob > 0:
            if student.null_cond is None:
                raise FewstepError("cond_drop_prob > 0 needs a model with a null condition")
            for k, v in cond.items():
                null = student.null_cond[k].to(v.device).expand_as(v)
                mask = expand_as(drop, v)
                cond[k] = torch.where(mask, null, v)
        x_t = student.schedule.add_noise(x0, eps, t)
        pred = student.native(x_t, t, cond)
        target = student.native_target(x0, eps, t)
        per_sample = ((pred - target) ** 2).flatten(1).mean(1)
        if self.weighting == "min_snr":
            alpha, sigma = student.schedule.alpha_sigma(t)
            snr = (alpha / sigma) ** 2
            w = torch.clamp(snr, max=self.snr_gamma) / {"epsilon": snr, "v_prediction": snr + 1}.get(student.prediction_type, torch.ones_like(snr))
            per_sample = per_sample * w.float().to(per_sample.device)
        loss = per_sample.mean()
        return LossOutput(loss, {"loss": loss.detach()})
