"""The loss protocol: what the one shared loop asks of every method.

A loss owns its auxiliary networks (fake score, discriminator), says which phase runs at a step
and which modules each phase trains, and returns a scalar loss for a phase. The loop owns
everything else and never asks which loss it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..denoisers import Denoiser
from ..errors import FewstepError


@dataclass
class LossOutput:
    """A scalar loss to backpropagate, and floats (or 0-d tensors) to log."""

    loss: Tensor
    logs: dict[str, Any] = field(default_factory=dict)


class DistillationLoss(nn.Module):
    """Base class with the defaults of a one-phase loss that trains the student only.

    ``batch`` is a dict from the data pipeline with ``seeds`` (per-sample seeds; draw every random
    number through ``fewstep.rng.SampleRNG(batch["seeds"])``), plus ``x0`` and condition tensors
    as the data provides them.
    """

    phases: tuple[str, ...] = ("student",)
    #: modules (of ``modules_to_train``) a recipe may give optimizer settings of their own (``optimizers.NAME``)
    #: although no phase has their name: they train as a parameter group of the phase that trains them
    groups: tuple[str, ...] = ()
    #: the data a loss needs: "x0" (images/latents/vectors) and/or "cond" (prompts, labels)
    needs: tuple[str, ...] = ("x0",)
    #: valid values of name-valued arguments, checked with the recipe before any stage runs
    choices: dict[str, tuple[str, ...]] = {}

    @classmethod
    def settings(cls, **kwargs: Any) -> dict[str, Any]:
        """``kwargs`` with every other keyword argument of ``__init__`` at its default (defaults live once)."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        return {**{n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}, **kwargs}

    @classmethod
    def check(cls, **kwargs: Any) -> None:
        """Checks of settings that need no model or data (files the loss will read), run with the recipe, so a
        later stage's missing file is reported before the first stage starts."""

    @classmethod
    def phases_for(cls, **kwargs: Any) -> tuple[str, ...]:
        """The phases a loss built with these keyword arguments runs (what ``optimizers.PHASE`` may name)."""
        return cls.phases

    def modules_to_train(self) -> dict[str, nn.Module]:
        """Trainable networks the loss owns (not the student), by name; checkpointed by the loop."""
        return {}

    def swap_module(self, name: str, module: nn.Module) -> None:
        """Call ``module`` from now on where the network ``name`` of ``modules_to_train`` was called: the
        loop passes the network wrapped by accelerate (DistributedDataParallel), whose forward averages
        gradients across processes, and passes the bare network back for saving and sampling."""
        raise FewstepError(f"{type(self).__name__} trains no module {name!r}; it trains: "
                           f"{', '.join(self.modules_to_train()) or 'only the student'}")

    def phase_modules(self, phase: str) -> tuple[str, ...]:
        """Names of the modules a phase trains: "student" and/or keys of ``modules_to_train``."""
        return ("student",)

    def phase_for(self, step: int) -> str:
        """The phase to run at optimizer step ``step`` (0-based)."""
        return self.phases[0]

    def forward(self, phase: str, batch: dict, student: Denoiser, teacher: Denoiser | None) -> LossOutput:
        raise NotImplementedError

    def sampler_settings(self) -> dict[str, Any]:
        """Settings the student must be sampled with to run what this loss trained (fewstep.sampling): they join
        the recipe's ``sample`` section in the exported ``fewstep.json``."""
        return {}

    def on_step_end(self, phase: str, student: Denoiser) -> None:
        """Called after each optimizer step of ``phase`` (e.g. to update an EMA target)."""

    def extra_state(self) -> dict[str, Tensor]:
        """Non-parameter state to checkpoint (running statistics), as tensors."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got {sorted(state)}")
