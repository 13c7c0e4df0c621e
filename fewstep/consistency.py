"""The consistency parameterization (Song et al. 2023, "Consistency Models"; LCM, Luo et al. 2023).

f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t), with t the network time 0..1000 scaled by
``timestep_scaling`` (10 in LCM):
c_skip = sigma_d^2 / ((10 t)^2 + sigma_d^2), c_out = 10 t / sqrt((10 t)^2 + sigma_d^2), sigma_d = 0.5.
At t = 0, c_skip = 1 and c_out = 0, so f(x, 0) = x exactly (the boundary condition). Flow
students use t = 1000 s. diffusers' LCMScheduler computes the same coefficients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .denoisers.base import Cond, Denoiser, Guidance
from .schedules import expand_as

TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def boundary_coefficients(t: Tensor | float, like: Tensor, timestep_scaling: float = TIMESTEP_SCALING,
                          sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) in float32, shaped to broadcast against ``like``; t < 0 (the clean end) counts as 0."""
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    scaled = t.clamp_min(0) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return expand_as(c_skip.float(), like), expand_as(c_out.float(), like)


def consistency_function(den: Denoiser, x: Tensor, t: Tensor | float, cond: Cond | None = None, *,
                         guidance: Guidance = None, timestep_scaling: float = TIMESTEP_SCALING,
                         sigma_data: float = SIGMA_DATA) -> Tensor:
    """f(x, t) in float32 (with gradients when the caller allows them)."""
    c_skip, c_out = boundary_coefficients(t, x, timestep_scaling, sigma_data)
    x0_hat = den(x, t, cond, guidance=guidance)
    return c_skip * x.float() + c_out * x0_hat
