"""TrigFlow (Lu & Song 2025, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", sec. 2).

x_hat = cos(t_hat) x0 + sin(t_hat) z with z ~ N(0, sigma_d^2 I) and t_hat in [0, pi/2]; the network F(x_hat / sigma_d, t_hat)
gives the probability-flow velocity dx_hat/dt_hat = sigma_d F and the consistency function
f(x_hat, t_hat) = cos(t_hat) x_hat - sin(t_hat) sigma_d F.

Any fewstep denoiser is viewed in TrigFlow by matching noise-to-signal ratios (sCM sec. 2 for EDM; FastGen's
TrigFlowPrecond does the same for x0 networks): sigma_t / alpha_t = sigma_d tan(t_hat), and the native point is
x_t = x_hat sqrt(alpha_t^2 + sigma_t^2 / sigma_d^2) (for VP, 1 / sqrt(cos^2 + sigma_d^2 sin^2); for flow, alpha = 1 - s).
With x0_hat the denoiser's prediction at that point, sigma_d F = (cos(t_hat) x_hat - x0_hat) / sin(t_hat), so f = x0_hat:
the consistency function of a TrigFlow view is the wrapper's x0 prediction, and sampling it is denoise-then-renoise.
Every map here is differentiable in t_hat (``Schedule.t_from_ratio``, ``Schedule.alpha_sigma``), so forward-mode AD
through a view gives the exact tangent the continuous-time objective needs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..schedules import Schedule, expand_as
from .base import Cond, Denoiser, Guidance

#: TrigFlow's largest time; a flow schedule reaches it at s = 1 (kept this far inside for tan and 1 / sin)
T_HAT_EDGE = 1e-4


def trig_coefficients(t_hat: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(cos t_hat, sin t_hat) in ``like``'s dtype, shaped to broadcast against it (B, ...)."""
    return expand_as(torch.cos(t_hat).to(like.dtype), like), expand_as(torch.sin(t_hat).to(like.dtype), like)


def noisiest_time(schedule: Schedule) -> float:
    """The schedule's noisiest native time: T - 1 (VP table) or T (flow, s = 1)."""
    return float(schedule.num_train_timesteps - (1 if schedule.kind == "vp" else 0))


def trig_time(schedule: Schedule, t: Tensor | float, sigma_data: float) -> Tensor:
    """t_hat = atan2(sigma_t, alpha_t sigma_d) (float64) for native time ``t``."""
    alpha, sigma = schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
    return torch.atan2(sigma, alpha * sigma_data)


def native_time(schedule: Schedule, t_hat: Tensor, sigma_data: float) -> Tensor:
    """The native time whose sigma / alpha equals sigma_d tan(t_hat) (float64, differentiable in ``t_hat``)."""
    return schedule.t_from_ratio(sigma_data * torch.tan(torch.as_tensor(t_hat, dtype=torch.float64)))


def trig_range(schedule: Schedule, sigma_data: float) -> tuple[float, float]:
    """(t_hat_min, t_hat_max): the TrigFlow times the schedule's native range [0, T - 1] (VP) or [0, T] (flow) covers."""
    # 0-dim times: fewstep.testing.devices reads alpha_sigma's table.to(t.device) as a move to the accelerator, so a
    # (1,) host time there was a false alarm (on CUDA both stay on the host); a 0-dim operand is a scalar either way
    lo = float(trig_time(schedule, 0.0, sigma_data))
    hi = float(trig_time(schedule, noisiest_time(schedule), sigma_data))
    return max(lo, T_HAT_EDGE), min(hi, math.pi / 2 - T_HAT_EDGE)


class TrigFlowView:
    """A denoiser seen in TrigFlow coordinates (no parameters of its own; the network stays the denoiser's).

    ``x0(x_hat, t_hat)``, ``velocity`` (sigma_d F) and ``F`` take TrigFlow points; ``to_native`` gives the native
    (x_t, t) a TrigFlow point corresponds to. Computed in the dtype of ``x_hat`` (float64 in the tests).
    """

    def __init__(self, denoiser: Denoiser, sigma_data: float = 0.5) -> None:
        self.denoiser, self.sigma_data = denoiser, float(sigma_data)

    def to_native(self, x_hat: Tensor, t_hat: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, t): the native point with the same noise-to-signal ratio; x_t = x_hat sqrt(alpha^2 + sigma^2 / sigma_d^2)."""
        t = native_time(self.denoiser.schedule, t_hat, self.sigma_data)
        alpha, sigma = self.denoiser.schedule.alpha_sigma(t)
        scale = (alpha * alpha + (sigma / self.sigma_data) ** 2).sqrt()
        return x_hat * expand_as(scale.to(x_hat.dtype), x_hat), t

    def x0(self, x_hat: Tensor, t_hat: Tensor, cond: Cond | None = None, *, guidance: Guidance = None) -> Tensor:
        """The denoiser's x0 prediction at the native point of (x_hat, t_hat), in ``x_hat``'s dtype."""
        x_t, t = self.to_native(x_hat, t_hat)
        return self.denoiser(x_t, t, cond, guidance=guidance).to(x_hat.dtype)

    def velocity(self, x_hat: Tensor, t_hat: Tensor, cond: Cond | None = None, *, guidance: Guidance = None) -> Tensor:
        """sigma_d F = dx_hat/dt_hat = (cos(t_hat) x_hat - x0_hat) / sin(t_hat) (sCM eq. 2 with v = cos z - sin x0)."""
        x0 = self.x0(x_hat, t_hat, cond, guidance=guidance)
        cos, sin = trig_coefficients(t_hat, x_hat)
        return (cos * x_hat - x0) / sin

    def F(self, x_hat: Tensor, t_hat: Tensor, cond: Cond | None = None, *, guidance: Guidance = None) -> Tensor:
        """F_theta(x_hat / sigma_d, t_hat): the velocity in units of sigma_d (the denoiser's direct
        ``trigflow_F`` where it has one and no guidance is asked, else through the native point)."""
        if guidance is None:
            direct = self.denoiser.trigflow_F(x_hat, t_hat, self.sigma_data, cond)
            if direct is not None:
                return direct.to(x_hat.dtype)
        return self.velocity(x_hat, t_hat, cond, guidance=guidance) / self.sigma_data


def consistency_from_F(F: Tensor, x_hat: Tensor, t_hat: Tensor, sigma_data: float) -> Tensor:
    """f(x_hat, t_hat) = cos(t_hat) x_hat - sin(t_hat) sigma_d F (sCM eq. 9): the TrigFlow consistency function."""
    cos, sin = trig_coefficients(t_hat, x_hat)
    return cos * x_hat - sin * sigma_data * F


#: SCMScheduler.set_timesteps' intermediate time for two steps (diffusers; SANA-Sprint's value)
INTERMEDIATE_T_HAT = 1.3


def trigflow_timesteps(schedule: Schedule, num_steps: int, sigma_data: float = 0.5,
                       intermediate: float = INTERMEDIATE_T_HAT) -> Tensor:
    """Native sampling timesteps (float64, descending, clean end excluded) of diffusers' SCMScheduler grid:
    t_hat = pi/2 (the schedule's noisiest native time), then ``intermediate`` for two steps, else
    linspace(pi/2, 0, num_steps + 1); VP timesteps are rounded to integers, as a pipeline's scheduler indexes them."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    top = noisiest_time(schedule)
    inner = [intermediate] if num_steps == 2 else torch.linspace(trig_range(schedule, sigma_data)[1], 0, num_steps + 1)[1:-1].tolist()
    ts = [top, *(float(native_time(schedule, torch.tensor([t], dtype=torch.float64), sigma_data)) for t in inner)]
    if schedule.kind == "vp":
        ts = [float(round(t)) for t in ts]
    return torch.tensor(ts, dtype=torch.float64)
