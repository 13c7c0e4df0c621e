"""Loss objects, one method per file, all plugged into the one loop (fewstep.loop)."""
from ..errors import lookup
from .base import DistillationLoss, LossOutput, Models
from .classifier import ClassifierLoss
from .consistency import ConsistencyDistillationLoss
from .diffusion import DiffusionLoss
from .fdivergence import FDivergenceLoss
from .flow_distill import FlowDistillLoss
from .ode_regression import ODERegressionLoss
from .reflow import ReflowLoss
from .rcm import RCMLoss
from .scm import SCMLoss

LOSSES: dict[str, type[DistillationLoss]] = {
    "diffusion": DiffusionLoss, "classifier": ClassifierLoss, "reflow": ReflowLoss, "flow_distill": FlowDistillLoss,
    "consistency": ConsistencyDistillationLoss, "fdistill": FDivergenceLoss, "ode_regression": ODERegressionLoss,
    "scm": SCMLoss, "rcm": RCMLoss,
}


def loss_class(name: str) -> type[DistillationLoss]:
    """The loss class registered under ``name`` (an unknown name lists the valid ones)."""
    return lookup(LOSSES, name, "loss")


__all__ = ["ClassifierLoss", "ConsistencyDistillationLoss", "DiffusionLoss", "DistillationLoss", "FDivergenceLoss", "FlowDistillLoss", "LOSSES", "LossOutput", "Models",
           "ODERegressionLoss", "RCMLoss", "ReflowLoss", "SCMLoss",
           "loss_class"]
