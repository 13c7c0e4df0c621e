"""A model's sampler from its sampler settings (``fewstep.json`` "sampler", the recipe's ``sample`` section plus
what the loss trained under), so every sampling path runs what was trained.

Settings a loss adds (``DistillationLoss.sampler_settings``):

- consistency (LCM): ``timestep_scaling`` and ``sigma_data`` of the boundary coefficients c_skip, c_out, and
  ``original_steps`` N, the skipping-step grid ``spacing: lcm`` picks from (LCMScheduler's
  ``original_inference_steps``);
- sCM: ``sigma_data``, the TrigFlow scale its ``spacing: trigflow`` grid is laid out in, and ``intermediate_t``,
  the grid's middle time for two steps (SCMScheduler's ``intermediate_timesteps``);
- f-distill / DMD2: ``timesteps``, the generator's own timesteps (DMD2 SDXL's one step at
  ``conditioning_timestep`` 399 from pure noise).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .schedules import Schedule
from .solvers import Solver, make_solver

#: sampler settings the consistency solver takes as keyword arguments
CONSISTENCY_SETTINGS = ("timestep_scaling", "sigma_data")


def sampler_solver(settings: dict[str, Any], *, seed: int | None = None, name: str | None = None) -> Solver:
    """The solver ``name`` (default the model's own) with the boundary settings it was trained with."""
    name = name or settings["solver"]
    kw = {k: settings[k] for k in CONSISTENCY_SETTINGS if name == "consistency" and settings.get(k) is not None}
    return make_solver(name, seed=seed, **kw)


def sampler_grid(schedule: Schedule, settings: dict[str, Any], steps: int | None = None) -> Tensor:
    """The grid a sampler visits: the model's trained ``timesteps`` when asked for that many steps, else the
    schedule's grid for ``steps`` (default the model's) with its spacing (``lcm``: from ``original_steps``)."""
    n = steps or settings["steps"]
    if settings.get("spacing") == "trigflow":  # sCM students: diffusers' SCMScheduler grid in TrigFlow time
        from .denoisers.trigflow import INTERMEDIATE_T_HAT, trigflow_timesteps

        ts = trigflow_timesteps(schedule, n, settings.get("sigma_data") or 0.5,
                                settings.get("intermediate_t") or INTERMEDIATE_T_HAT)
        return torch.cat([ts, torch.tensor([schedule.t_clean], dtype=torch.float64)])
    fixed = settings.get("timesteps")
    if fixed is not None and len(fixed) == n:
        return torch.tensor([*(float(t) for t in fixed), schedule.t_clean], dtype=torch.float64)
    return schedule.sampling_grid(n, settings.get("spacing"), original_steps=settings.get("original_steps") or 50)
