"""The networks a run trains, found where they live, and accelerate's wrappers put in their place.

The student's network is ``student.net``; a loss declares its own (fake score, discriminator) by submodule
path (``DistillationLoss.trains``). For training, each is replaced by its accelerate wrapper
(DistributedDataParallel when several processes run, whose backward averages gradients); for sampling,
saving and export the bare networks go back. No loss code takes part.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from .errors import FewstepError


def trainable(module: nn.Module) -> dict[str, Tensor]:
    """A module's parameters that train (requires_grad), by name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class TrainedNetworks:
    """``bare``: name -> network ("student" and the loss's ``trains``); ``wrapped`` after ``prepare``."""

    def __init__(self, student: nn.Module, loss: nn.Module) -> None:
        self.places: dict[str, tuple[nn.Module, str]] = {"student": (student, "net")}
        for name, path in loss.trains().items():
            if name == "student":
                raise FewstepError(f"{type(loss).__name__}.trains names a network 'student'; that name is the student's")
            self.places[name] = (loss, path)
        self.bare: dict[str, nn.Module] = {n: owner.get_submodule(p) for n, (owner, p) in self.places.items()}
        self.wrapped: dict[str, nn.Module] = dict(self.bare)

    def prepare(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap every network (``wrap``: accelerate's ``prepare_model``) and call the wrappers from now on."""
        self.wrapped = {n: wrap(m) for n, m in self.bare.items()}
        self._install(self.wrapped)

    def _install(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            owner, path = self.places[name]
            owner.set_submodule(path, module)

    @contextlib.contextmanager
    def standing_in(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """``modules`` (name -> a module of the same structure: a sharded network's whole twin) in the networks'
        places within the block."""
        self._install(modules)
        try:
            yield
        finally:
            self._install({n: self.wrapped[n] for n in modules})

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[None]:
        """The bare networks in place of the wrappers (sampling, evaluation and export run on the main process
        alone, where a wrapper's forward would wait for the other processes)."""
        if all(self.wrapped[n] is m for n, m in self.bare.items()):
            yield
            return
        self._install(self.bare)
        try:
            yield
        finally:
            self._install(self.wrapped)


def freeze_teacher(teacher: nn.Module, trained: list[nn.Module]) -> None:
    """Freeze the teacher, except the parameters of ``trained`` networks that sit on it (a LoRA fake score's
    adapters on the teacher's UNet): what trains follows from the networks declared, not from the loss."""
    keep = [p for m in trained for p in m.parameters() if p.requires_grad]
    teacher.requires_grad_(False)
    for p in keep:
        p.requires_grad_(True)
