"""The loss protocol: what the one shared loop asks of every method.

A loss is built once, by ``Loss.from_models(models, **settings)`` (``settings``: the recipe's ``loss``
section; defaults live once, in ``__init__``'s signature). It owns its auxiliary networks (fake score,
discriminator) and declares them by submodule path (``trains``); the loop puts accelerate's wrappers
in their place without the loss's help. It says which phase runs at a step (``phase_cycle``) and which
networks each phase trains, and returns a scalar loss for a phase. The loop never asks which loss it runs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..config import check_kwargs
from ..denoisers import Denoiser
from ..errors import check_choice


@dataclass
class LossOutput:
    """A scalar loss to backpropagate, and floats (or 0-d tensors) to log."""

    loss: Tensor
    logs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Models:
    """What a loss may be built from: the run's networks and what describes them.

    ``teacher``: the frozen teacher (None for losses without one); ``student``: the network being trained;
    ``schedule``: the run's noise schedule; ``pipeline``: the diffusers pipeline of a latent model (its VAE,
    text encoders), else None; ``sample_shape``: the shape of one sample (C, H, W) or (D,).
    """

    teacher: Denoiser | None
    student: Denoiser
    schedule: Any = None
    pipeline: Any = None
    sample_shape: tuple[int, ...] = ()


class DistillationLoss(nn.Module):
    """Base class with the defaults of a one-phase loss that trains the student only.

    ``batch`` is a dict from the data pipeline with ``seeds`` (per-sample seeds; draw every random
    number through ``fewstep.rng.SampleRNG(batch["seeds"])``), plus ``x0`` and condition tensors
    as the data provides them.
    """

    #: every phase the loss can run (an instance runs ``phases_for`` its settings, a subset)
    phases: tuple[str, ...] = ("student",)
    #: the phase that trains the student (its steps are the student's updates)
    student_phase: str = "student"
    #: modules (of ``trains``) a recipe may give optimizer settings of their own (``optimizers.NAME``)
    #: although no phase has their name: they train as a parameter group of the phase that trains them
    groups: tuple[str, ...] = ()
    #: the data a loss needs, each with why: "x0" (images/latents/vectors), "noise" (teacher pairs), "cond"
    needs: dict[str, str] = {"x0": ""}
    #: valid values of name-valued settings, checked with the recipe before any stage runs
    choices: dict[str, tuple[str, ...]] = {}
    #: constructor arguments ``from_models`` supplies from the models (networks), never the recipe
    provided: tuple[str, ...] = ()
    #: the repeating phase sequence of an instance (step i runs ``cycle[i % len(cycle)]``)
    cycle: tuple[str, ...] = ("student",)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(cls, models: Models, **settings: Any) -> "DistillationLoss":
        """The one construction entry point: the loss with these settings, its networks made from ``models``."""
        return cls(**settings)

    @classmethod
    def settings(cls, **kwargs: Any) -> dict[str, Any]:
        """``kwargs`` with every other recipe setting (keyword argument of ``__init__``) at its default."""
        params = inspect.signature(cls.__init__).parameters
        return {**{n: p.default for n, p in params.items()
                   if p.default is not inspect.Parameter.empty and n not in cls.provided}, **kwargs}

    @classmethod
    def checked_settings(cls, settings: dict[str, Any], key: str = "loss", choice_prefix: str = "") -> dict[str, Any]:
        """``settings`` coerced to ``__init__``'s types, an unknown key or name refused with the valid ones (``key``
        names the section in the message, ``choice_prefix`` a name-valued setting)."""
        out = check_kwargs(cls, dict(settings), key, skip=cls.provided)
        for name, valid in cls.choices.items():
            if name in out:
                check_choice(out[name], valid, choice_prefix + name)
        return out

    @classmethod
    def check(cls, **settings: Any) -> None:
        """Checks of settings that need no model or data (files the loss will read), run with the recipe, so a
        later stage's missing file is reported before the first stage starts."""

    @classmethod
    def grads_through_teacher(cls, **settings: Any) -> bool:
        """Whether a trained term's gradient crosses the frozen teacher's network (f-distill's GAN head on its
        features): then its train.teacher_dtype must keep that gradient (benchmarks/precision.py)."""
        return False

    @classmethod
    def phase_cycle(cls, **settings: Any) -> tuple[str, ...]:
        """The phases a loss with these settings runs, in the order they repeat (f-distill: k fake-score
        steps, then a generator step)."""
        return (cls.student_phase,)

    @classmethod
    def phases_for(cls, **settings: Any) -> tuple[str, ...]:
        """The phases a loss with these settings runs (what ``optimizers.PHASE`` may name)."""
        return tuple(dict.fromkeys(cls.phase_cycle(**settings)))

    @classmethod
    def groups_for(cls, **settings: Any) -> tuple[str, ...]:
        """The parameter groups ``optimizers.NAME`` may also name: every one the loss can train, even when these
        settings build no such network (f-distill's reverse_kl without GAN has no discriminator), so a recipe that
        switches the divergence by an override keeps its discriminator's settings."""
        return cls.groups

    @classmethod
    def loop_steps(cls, student_updates: int, **settings: Any) -> int:
        """Loop steps that give ``student_updates`` updates of the student (the first steps of the cycle)."""
        cycle = cls.phase_cycle(**settings)
        steps = updates = 0
        while updates < student_updates:
            updates += cycle[steps % len(cycle)] == cls.student_phase
            steps += 1
        return steps

    # ------------------------------------------------------------------ networks
    def trains(self) -> dict[str, str]:
        """Networks the loss trains (not the student), by name: their submodule paths on the loss. The loop
        checkpoints them, and calls accelerate's wrapper of each in its place while training."""
        return {}

    def student_copies(self) -> dict[str, str]:
        """Frozen networks the loss keeps that copy the student's parameters and are updated from them (an EMA
        target), by submodule path: under train.parallel=fsdp they are sharded as the student is."""
        return {}

    def modules_to_train(self) -> dict[str, nn.Module]:
        """The networks of ``trains`` themselves."""
        return {name: self.get_submodule(path) for name, path in self.trains().items()}

    def phase_modules(self, phase: str) -> tuple[str, ...]:
        """Names of the networks a phase trains: "student" and/or keys of ``trains``."""
        return ("student",)

    def lora_alternatives(self) -> dict[str, tuple[int, list[str], str]]:
        """Networks of ``trains`` that are full copies of the teacher's and could instead be LoRA adapters on
        it: (rank, target modules, the setting that does it), for ``fewstep distill --dry-run``'s estimate."""
        return {}

    # ------------------------------------------------------------------ a step
    def phase_for(self, step: int) -> str:
        """The phase to run at optimizer step ``step`` (0-based)."""
        return self.cycle[step % len(self.cycle)]

    def forward(self, phase: str, batch: dict, student: Denoiser, teacher: Denoiser | None) -> LossOutput:
        raise NotImplementedError

    def on_step_end(self, phase: str, student: Denoiser) -> None:
        """Called after each optimizer step of ``phase`` (e.g. to update an EMA target)."""

    # ------------------------------------------------------------------ what leaves with the model and the checkpoint
    def sampler_settings(self) -> dict[str, Any]:
        """Settings the student must be sampled with to run what this loss trained (fewstep.sampling): they join
        the recipe's ``sample`` section in the exported ``fewstep.json``."""
        return {}

    def extra_state(self) -> dict[str, Tensor]:
        """Non-parameter state to checkpoint (running statistics), as tensors."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got {sorted(state)}")
