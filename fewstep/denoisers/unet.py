"""Adapters for diffusers UNets: UNet2DModel (unconditional or class-conditional) and
UNet2DConditionModel (SD 1.x/2.x; SDXL with its added text_embeds/time_ids conditions)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..schedules import Schedule
from .base import Cond, Denoiser


def _to(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype) if v.is_floating_point() else v


class UNetDenoiser(Denoiser):
    """Wraps a diffusers UNet. Condition keys: ``class_labels`` for UNet2DModel;
    ``encoder_hidden_states``, ``class_labels``, ``text_embeds``, ``time_ids`` for UNet2DConditionModel."""

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str, **kwargs) -> None:
        config = unet.config
        kwargs.setdefault("guidance_embedding_dim", getattr(config, "time_cond_proj_dim", None))
        super().__init__(schedule, prediction_type, **kwargs)
        self.net = unet
        self.conditional = hasattr(config, "cross_attention_dim")
        self.cond_keys = (
            ("encoder_hidden_states", "class_labels", "text_embeds", "time_ids") if self.conditional else ("class_labels",)
        )

    def network_output(self, x_t: Tensor, t: Tensor, cond: Cond | None, timestep_cond: Tensor | None) -> Tensor:
        dtype = self.net_dtype
        cond = {k: _to(v, dtype) for k, v in (cond or {}).items()}
        if not self.conditional:
            return self.net(x_t.to(dtype), t.float(), class_labels=cond.get("class_labels"), return_dict=False)[0]
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        return self.net(
            x_t.to(dtype),
            t.float(),
            encoder_hidden_states=cond.get("encoder_hidden_states"),
            class_labels=cond.get("class_labels"),
            timestep_cond=None if timestep_cond is None else timestep_cond.to(dtype),
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]
