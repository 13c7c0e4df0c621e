"""Loss objects, one method per file, all plugged into the one loop (fewstep.loop)."""
from ..errors import lookup
from .base import DistillationLoss, LossOutput
from .classifier import ClassifierLoss
from .diffusion import DiffusionLoss

LOSSES: dict[str, type[DistillationLoss]] = {"diffusion": DiffusionLoss, "classifier": ClassifierLoss}


def loss_class(name: str) -> type[DistillationLoss]:
    """The loss class registered under ``name`` (an unknown name lists the valid ones)."""
    return lookup(LOSSES, name, "loss")


__all__ = ["ClassifierLoss", "DiffusionLoss", "DistillationLoss", "LOSSES", "LossOutput", "loss_class"]
