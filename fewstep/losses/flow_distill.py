"""Distilling a (k-)rectified flow into k Euler steps (InstaFlow, Liu et al. 2023, section 3.3;
Liu et al. 2022, section 2.3): x1_hat = Euler_k(u_theta, z) against the pair's endpoint x1.

The Euler grid is the student's own sampling grid (FlowSchedule.sampling_grid(k), the grid of
diffusers' FlowMatchEulerDiscreteScheduler), so the exported sampler runs exactly what was trained.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import FewstepError
from .base import LossOutput
from .pair_loss import PairLoss
from .reflow import check_flow_student


def euler_flow(student, z: torch.Tensor, grid: torch.Tensor, cond) -> torch.Tensor:
    """x <- x + (s' - s) u_theta(x, s) along ``grid`` (fewstep time, descending to 0), with gradients."""
    T = student.schedule.num_train_timesteps
    x = z
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        u = student.native(x, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device), cond)
        x = x + (t_next - t) / T * u
    return x


class FlowDistillLoss(PairLoss):
    """d(Euler_k(u_theta, z, c), x1) over pairs (z, x1, c).

    Args:
        steps: k, the student's step count (1 for one step).
        distance: "l2" (InstaFlow's first phase), "pseudo_huber" (constant ``huber_c``), or "lpips"
            (Zhang et al. 2018, VGG; weights from ``lpips_weights``, see fewstep.lpips).
        decode: compare images decoded by the pipeline's VAE (differentiably) instead of latents.
    """

    def __init__(self, *, steps: int = 1, distance: str = "l2", huber_c: float = 0.001, lpips_weights: str | None = None,
                 decode: bool = False, decoder: Any = None) -> None:
        super().__init__(distance=distance, huber_c=huber_c, lpips_weights=lpips_weights, decode=decode, decoder=decoder)
        if steps < 1:
            raise FewstepError(f"steps must be at least 1, got {steps}")
        self.steps = steps

    def forward(self, phase, batch, student, teacher):
        check_flow_student(student, "flow_distill")
        x1, z = batch["x0"].float(), batch["noise"].float()
        cond = student.batch_cond(batch)
        grid = student.schedule.sampling_grid(self.steps)
        loss = self.distance(euler_flow(student, z, grid, cond), x1).mean()
        return LossOutput(loss, {"loss": loss.detach()})
