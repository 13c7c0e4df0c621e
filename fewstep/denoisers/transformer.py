"""Adapter for SD3-style flow transformers (diffusers SD3Transformer2DModel; Esser et al. 2024)."""
from __future__ import annotations

from torch import Tensor, nn

from ..schedules import Schedule
from .base import Cond, Denoiser


class SD3Denoiser(Denoiser):
    """Wraps an MMDiT. Condition keys: ``encoder_hidden_states``, ``pooled_projections``.

    SD3 predicts the flow velocity u = eps - x0 and receives t = 1000 s, which is fewstep time.
    """

    cond_keys = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, transformer: nn.Module, schedule: Schedule, prediction_type: str = "flow", **kwargs) -> None:
        super().__init__(schedule, prediction_type, **kwargs)
        self.net = transformer

    def network_output(self, x_t: Tensor, t: Tensor, cond: Cond | None, timestep_cond: Tensor | None) -> Tensor:
        dtype = self.net_dtype
        cond = {k: v.to(dtype) for k, v in (cond or {}).items()}
        return self.net(
            hidden_states=x_t.to(dtype),
            timestep=t.float(),
            encoder_hidden_states=cond.get("encoder_hidden_states"),
            pooled_projections=cond.get("pooled_projections"),
            return_dict=False,
        )[0]
