"""Teacher ODE/SDE solvers with one signature: ``step(denoiser, x, t, t_next, cond, state, guidance=...)``.

Every solver only asks the denoiser for (x0_hat, eps_hat) and the schedule for (alpha, sigma),
so it runs on any schedule and parameterization. Grids come from ``Schedule.sampling_grid``.
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .consistency import SIGMA_DATA, TIMESTEP_SCALING, consistency_function
from .denoisers.base import Cond, Denoiser, Guidance
from .errors import FewstepError, lookup

State = dict[str, Any] | None


class Solver(Protocol):
    def step(self, denoiser: Denoiser, x: Tensor, t: Tensor | float, t_next: Tensor | float,
             cond: Cond | None = None, state: State = None, *, guidance: Guidance = None) -> tuple[Tensor, State]: ...


class DDIM:
    """DDIM (Song et al. 2021, eq. 12): x' = alpha' x0_hat + sqrt(sigma'^2 - s_eta^2) eps_hat + s_eta z.

    eta = 0 is deterministic; on a flow schedule it is exactly Euler on the velocity. With eta > 0,
    s_eta = eta sqrt(sigma'^2 / sigma^2 (1 - alpha^2 / alpha'^2)) as in the paper; z from ``generator``.
    """

    order = 1

    def __init__(self, eta: float = 0.0, generator: torch.Generator | None = None) -> None:
        if eta < 0:
            raise FewstepError(f"eta must be >= 0, got {eta}")
        self.eta, self.generator = eta, generator

    def step(self, denoiser, x, t, t_next, cond=None, state=None, *, guidance=None):
        x0, eps = denoiser.predict(x, t, cond, guidance=guidance)
        z = None
        if self.eta > 0:
            z = denoiser.draw_noise(x.shape, self.generator).to(x.device)
        return ddim_update(denoiser.schedule, x0, eps, t, t_next, eta=self.eta, z=z).to(x.dtype), state


def ddim_update(schedule, x0: Tensor, eps: Tensor, t, t_next, *, eta: float = 0.0, z: Tensor | None = None) -> Tensor:
    """One DDIM step from the prediction (x0, eps) at t to t_next (float32); ``z`` is the noise when eta > 0."""
    a, s = schedule.coefficients(t, x0)
    a2, s2 = schedule.coefficients(t_next, x0)
    if eta == 0:
        return a2 * x0 + s2 * eps
    s_eta = eta * ((s2**2 / s**2) * (1 - a**2 / a2**2)).clamp_min(0).sqrt()
    return a2 * x0 + (s2**2 - s_eta**2).clamp_min(0).sqrt() * eps + s_eta * z


class Euler:
    """Euler on the probability-flow ODE in the schedule's ODE coordinates (Schedule.ode_coords):
    VP: y = x / alpha against r = sigma / alpha (Karras et al. 2022); flow: x against s (the velocity)."""

    order = 1

    def step(self, denoiser, x, t, t_next, cond=None, state=None, *, guidance=None):
        x0, eps = denoiser.predict(x, t, cond, guidance=guidance)
        sch = denoiser.schedule
        c, r = sch.ode_coords(t, x)
        c2, r2 = sch.ode_coords(t_next, x)
        y = x.float() / c + (r2 - r) * sch.ode_derivative(x0, eps)
        return (c2 * y).to(x.dtype), state


class Heun:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1) in the schedule's ODE coordinates;
    the final step to the clean end is an Euler step, as in EDM."""

    order = 2

    def step(self, denoiser, x, t, t_next, cond=None, state=None, *, guidance=None):
        sch = denoiser.schedule
        x0, eps = denoiser.predict(x, t, cond, guidance=guidance)
        c, r = sch.ode_coords(t, x)
        c2, r2 = sch.ode_coords(t_next, x)
        d1 = sch.ode_derivative(x0, eps)
        y = x.float() / c
        y_euler = y + (r2 - r) * d1
        if bool((r2 == 0).all()):
            return (c2 * y_euler).to(x.dtype), state
        x0_2, eps_2 = denoiser.predict((c2 * y_euler).to(x.dtype), t_next, cond, guidance=guidance)
        d2 = sch.ode_derivative(x0_2, eps_2)
        return (c2 * (y + (r2 - r) * 0.5 * (d1 + d2))).to(x.dtype), state


class DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction, midpoint form.

    With lambda = log(alpha / sigma) and h = lambda' - lambda:
    x' = (sigma'/sigma) x - alpha' (exp(-h) - 1) D,  D = x0 + (x0 - x0_prev) / (2 r),  r = h_prev / h.
    The first step and the final step to the clean end are first order (D = x0). ``state`` carries
    the previous x0_hat and step size.
    """

    order = 2

    def step(self, denoiser, x, t, t_next, cond=None, state=None, *, guidance=None):
        x0, _ = denoiser.predict(x, t, cond, guidance=guidance)
        a, s = denoiser.schedule.coefficients(t, x)
        a2, s2 = denoiser.schedule.coefficients(t_next, x)
        if bool((s2 == 0).all()):
            return (a2 * x0).to(x.dtype), {"x0": x0, "h": None}
        lam, lam2 = torch.log(a / s), torch.log(a2 / s2)
        h = lam2 - lam
        D = x0
        if state is not None and state.get("h") is not None:
            r = state["h"] / h
            D = x0 + (x0 - state["x0"]) / (2 * r)
        x_next = (s2 / s) * x.float() - a2 * torch.expm1(-h) * D
        return x_next.to(x.dtype), {"x0": x0, "h": h}


class Consistency:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCMScheduler): x0 = f(x, t), then
    re-noise to the next timestep with fresh noise from ``generator``; the last step returns f(x, t).
    Use it with ``spacing: lcm`` (LCM's timesteps) or ``trailing`` (999, 749, 499, 249 for four).
    ``timestep_scaling`` and ``sigma_data`` are the boundary coefficients' (fewstep.consistency); a student
    is sampled with the values its consistency loss trained with (fewstep.sampling)."""

    order = 1

    def __init__(self, generator: torch.Generator | None = None, timestep_scaling: float = TIMESTEP_SCALING,
                 sigma_data: float = SIGMA_DATA) -> None:
        self.generator = generator
        self.timestep_scaling, self.sigma_data = timestep_scaling, sigma_data

    def x0(self, denoiser, x, t, cond, guidance) -> Tensor:
        return consistency_function(denoiser, x, t, cond, guidance=guidance, timestep_scaling=self.timestep_scaling,
                                    sigma_data=self.sigma_data)

    def step(self, denoiser, x, t, t_next, cond=None, state=None, *, guidance=None):
        x0 = self.x0(denoiser, x, t, cond, guidance)
        if float(torch.as_tensor(t_next).reshape(-1)[0]) == denoiser.schedule.t_clean:
            return x0.to(x.dtype), state
        a2, s2 = denoiser.schedule.coefficients(t_next, x)
        z = denoiser.draw_noise(x.shape, self.generator).to(x.device)
        return (a2 * x0 + s2 * z).to(x.dtype), state


class Renoise(Consistency):
    """DMD2's k-step sampler: x0 = G(x, t) (the denoiser's x0 prediction, no boundary coefficients), then
    re-noise to the next timestep with fresh noise; one step is x0 at the top timestep. With
    ``spacing: trailing`` four steps are 999, 749, 499, 249."""

    def x0(self, denoiser, x, t, cond, guidance) -> Tensor:
        return denoiser(x, t, cond, guidance=guidance)


SOLVERS = {"ddim": DDIM, "euler": Euler, "heun": Heun, "dpmpp_2m": DPMSolverPP2M, "consistency": Consistency, "renoise": Renoise}


def make_solver(name: str, *, seed: int | None = None, **kwargs: Any) -> Solver:
    """A solver by name: ddim, euler, heun, dpmpp_2m, consistency or renoise. ``seed`` seeds the noise of
    the solvers that draw any (ddim with eta, consistency, renoise), so their samples are reproducible."""
    cls = lookup(SOLVERS, name, "solver")
    if seed is not None and "generator" in inspect.signature(cls.__init__).parameters and "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return cls(**kwargs)


@torch.no_grad()
def sample(denoiser: Denoiser, solver: Solver, x: Tensor, grid: Tensor, cond: Cond | None = None, *,
           guidance: Guidance = None, progress: bool = False) -> Tensor:
    """Integrate from x at grid[0] through every point of ``grid`` (descending; last = clean end)."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    state: State = None
    pairs = list(zip(grid[:-1].tolist(), grid[1:].tolist()))
    for t, t_next in tqdm(pairs, desc="sampling", disable=not progress, leave=False):
        x, state = solver.step(denoiser, x, t, t_next, cond, state, guidance=guidance)
    return x
