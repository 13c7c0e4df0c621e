"""Regression pre-training of a one-step generator onto teacher ODE pairs (DMD2, Yin et al. 2024: one-step SDXL
starts from it; tianweiy/DMD2 main/train_sd_ode.py, experiments/sdxl/README.md): x0_hat = G(z, t_c), the student's x0 prediction from pure noise z at the
conditioning timestep t_c, against the pair's ODE endpoint x1 of the same z:

    loss = mean_batch d(x0_hat, x1),   x0_hat = (z - sqrt(1 - abar_tc) eps_hat(z, t_c)) / sqrt(abar_tc)

DMD2 SDXL: t_c = 399, d = LPIPS on images decoded by the tiny VAE, 10k pairs (Euler, 50 trailing steps, CFG 8),
then distribution matching from this generator at the same t_c (its sampler is exported with the model).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import FewstepError
from .base import LossOutput, Models
from .pair_loss import PairLoss


class ODERegressionLoss(PairLoss):
    """d(G(z, t_c, c), x1) over teacher pairs (z, x1, c).

    Args:
        timestep: t_c, the timestep the one-step generator is called at (default T - 1; DMD2 SDXL 399).
        distance: "l2", "pseudo_huber" (constant ``huber_c``) or "lpips" (DMD2; weights ``lpips_weights``).
        decode: compare images decoded by the pipeline's VAE (DMD2 decodes both for LPIPS).
    """

    def __init__(self, *, timestep: int | None = None, distance: str = "l2", huber_c: float = 0.001,
                 lpips_weights: str | None = None, decode: bool = False, decoder: Any = None) -> None:
        super().__init__(distance=distance, huber_c=huber_c, lpips_weights=lpips_weights, decode=decode, decoder=decoder)
        self.timestep = None if timestep is None else int(timestep)

    @classmethod
    def from_models(cls, models: Models, **settings: Any) -> "ODERegressionLoss":
        student = models.student
        T = student.schedule.num_train_timesteps
        t = cls.settings(**settings)["timestep"]
        if t is not None and not 0 <= int(t) < T:
            raise FewstepError(f"loss.timestep {t} outside the schedule's 0..{T - 1}")
        if student.schedule.kind != "vp":
            raise FewstepError("ode_regression trains a VP generator at one timestep; a flow student uses "
                               "flow_distill (Euler steps of its velocity)")
        return super().from_models(models, **settings)

    def t_c(self, student) -> int:
        return self.timestep if self.timestep is not None else student.schedule.num_train_timesteps - 1

    def sampler_settings(self) -> dict[str, Any]:
        return {} if self.timestep is None else {"timesteps": [self.timestep]}

    def forward(self, phase, batch, student, teacher):
        x1, z = batch["x0"].float(), batch["noise"].float()
        cond = student.batch_cond(batch)
        t = torch.full((z.shape[0],), float(self.t_c(student)), dtype=torch.float64, device=z.device)
        loss = self.distance(student(z, t, cond), x1).mean()
        return LossOutput(loss, {"loss": loss.detach()})
