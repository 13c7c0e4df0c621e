"""Straightness of a flow (Liu et al. 2022, "Flow Straight and Fast", eq. 6):

S(Z) = integral_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt along the flow's own ODE trajectories.

S = 0 exactly when every trajectory is a straight line travelled at constant speed, which is when
one Euler step is exact. Computed with fine Euler steps on the flow schedule (uniform in s); the
velocity is eps_hat - x0_hat, so any denoiser on a flow schedule qualifies (the analytic mixture
on the flow schedule is the exact 1-rectified flow).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..denoisers import Denoiser
from ..errors import FewstepError


@torch.no_grad()
def straightness(denoiser: Denoiser, z: Tensor, *, steps: int = 200, cond=None) -> tuple[float, Tensor]:
    """(S, endpoints) for trajectories from noise ``z`` at s = 1 to s = 0 with ``steps`` Euler steps."""
    if denoiser.schedule.kind != "flow":
        raise FewstepError("straightness is defined on the flow schedule; this denoiser's schedule is "
                           f"{denoiser.schedule.kind}")
    T = denoiser.schedule.num_train_timesteps
    s_grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x = z.float()
    velocities = []
    for s, s_next in zip(s_grid[:-1].tolist(), s_grid[1:].tolist()):
        x0, eps = denoiser.predict(x, torch.full((x.shape[0],), s * T, dtype=torch.float64), cond)
        u = eps - x0
        velocities.append(u)
        x = x + (s_next - s) * u
    # InstaFlow's time t = 1 - s runs from noise to data: dZ/dt = -u, Z_1 - Z_0 = x - z
    displacement = x - z.float()
    per_step = torch.stack([((displacement + u) ** 2).flatten(1).sum(1).mean() for u in velocities])
    return float(per_step.mean()), x
