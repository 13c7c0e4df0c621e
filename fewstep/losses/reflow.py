"""k-rectified flow (Liu et al. 2022, "Flow Straight and Fast"; InstaFlow, Liu et al. 2023).

Trains a velocity on straight interpolations between a pair's noise and the teacher's ODE endpoint.
fewstep uses diffusers' flow convention: x_s = (1 - s) x1 + s z with s = 1 at the noise, velocity
u = z - x1, network time t = 1000 s. InstaFlow writes x_t = t x1 + (1 - t) z with target x1 - z, so
its t = 1 - s and its velocity is -u: the sign flips at that boundary only (docs/reflow.md).
"""
from __future__ import annotations

import torch

from ..errors import FewstepError, check_choice
from ..rng import SampleRNG
from ..schedules import expand_as
from .base import DistillationLoss, LossOutput

TIME_SAMPLING = ("uniform", "logit_normal")


def check_flow_student(student, loss: str) -> None:
    if student.schedule.kind != "flow" or student.prediction_type != "flow":
        raise FewstepError(f"loss {loss} trains a velocity on the flow schedule; the student has a {student.schedule.kind} "
                           f"schedule and {student.prediction_type} output (set schedule.name=flow for a new network, "
                           f"or student.schedule=flow to reinterpret a VP teacher's copy)")


class ReflowLoss(DistillationLoss):
    """E || u_theta(x_s, s, c) - (z - x1) ||^2 over pairs (z, x1, c).

    Args:
        time_sampling: "uniform" (RectifiedFlow/InstaFlow: InstaFlow t ~ U(t_eps, 1), so s = 1 - t) or
            "logit_normal" (s = sigmoid(N(logit_mean, logit_std)), SD3, Esser et al. 2024).
        t_eps: the excluded sliver at the noise end in InstaFlow's time.
    """

    choices = {"time_sampling": TIME_SAMPLING}

    needs = {"x0": " (teacher pairs: data.name pairs)", "noise": ""}

    def __init__(self, *, time_sampling: str = "uniform", t_eps: float = 1e-3, logit_mean: float = 0.0,
                 logit_std: float = 1.0) -> None:
        super().__init__()
        self.time_sampling = check_choice(time_sampling, TIME_SAMPLING, "time_sampling")
        if not 0.0 <= t_eps < 1.0:
            raise FewstepError(f"t_eps must be in [0, 1), got {t_eps}")
        self.t_eps, self.logit_mean, self.logit_std = t_eps, logit_mean, logit_std

    def draw_s(self, rng: SampleRNG) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return 1.0 - rng.uniform(self.t_eps, 1.0)
        return torch.sigmoid(self.logit_mean + self.logit_std * rng.randn())

    def forward(self, phase, batch, student, teacher):
        check_flow_student(student, "reflow")
        x1, z = batch["x0"].float(), batch["noise"].float()
        s = self.draw_s(SampleRNG(batch["seeds"], x1.device)).double()
        x_s = (1 - expand_as(s.float(), x1)) * x1 + expand_as(s.float(), x1) * z
        cond = student.batch_cond(batch)
        u = student.native(x_s, s * student.schedule.num_train_timesteps, cond)
        loss = ((u - (z - x1)) ** 2).flatten(1).mean(1).mean()
        return LossOutput(loss, {"loss": loss.detach()})
