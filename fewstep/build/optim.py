"""Optimizers and LR schedules, one per phase of the loss, over the networks that phase trains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import FewstepError, lookup
from ..networks import trainable


@dataclass
class PhaseOptimizer:
    """A phase's optimizer (torch.optim class name + keyword arguments) and LR schedule; ``groups``: for a
    network the phase trains, keyword arguments of its own parameter group (its lr, betas, ...)."""

    name: str = "AdamW"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-4})
    scheduler: str = "constant"
    warmup_steps: int = 0
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)


def optimizer_classes() -> dict[str, type]:
    return {n: c for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer}


def scheduler_names() -> tuple[str, ...]:
    from diffusers.optimization import SchedulerType

    return tuple(s.value for s in SchedulerType)


def phase_steps(loss, max_steps: int) -> dict[str, int]:
    """How many of the run's ``max_steps`` each phase runs (the length of its LR schedule)."""
    totals = {p: 0 for p in loss.phases}
    for step in range(max_steps):
        totals[loss.phase_for(step)] += 1
    return totals


def build_optimizers(loss, networks: dict[str, nn.Module], specs: dict[str, PhaseOptimizer],
                     max_steps: int) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
    """(optimizers, LR schedules) by phase: each phase's optimizer over the trainable parameters of the
    networks ``loss.phase_modules(phase)`` names (``specs[phase]``, else ``specs["default"]``), a network with
    settings of its own in ``groups`` as its own parameter group; diffusers' ``get_scheduler`` over the steps the
    phase runs."""
    from diffusers.optimization import get_scheduler

    totals = phase_steps(loss, max_steps)
    optimizers, schedulers = {}, {}
    for phase in loss.phases:
        names = loss.phase_modules(phase)
        for n in names:
            lookup(networks, n, f"network of phase {phase!r}")
        per_network = {n: list(trainable(networks[n]).values()) for n in names}
        if not any(per_network.values()):
            raise FewstepError(f"phase {phase!r} has no trainable parameters (networks {', '.join(names)})")
        spec = specs.get(phase) or specs.get("default") or PhaseOptimizer()
        cls = lookup(optimizer_classes(), spec.name, "optimizer")
        own = [n for n in names if n in spec.groups]
        rest = [p for n in names if n not in spec.groups for p in per_network[n]]
        opt = cls([*([{"params": rest}] if rest else []),
                   *({"params": per_network[n], **spec.groups[n]} for n in own)], **spec.kwargs)
        if spec.scheduler not in scheduler_names():
            raise FewstepError(f"unknown lr_scheduler {spec.scheduler!r}; valid: {', '.join(scheduler_names())}")
        schedulers[phase] = get_scheduler(spec.scheduler, opt, num_warmup_steps=spec.warmup_steps,
                                          num_training_steps=max(1, totals[phase]))
        optimizers[phase] = opt
    return optimizers, schedulers
