"""Adapter for FLUX.1 transformers (diffusers FluxTransformer2DModel; Black Forest Labs 2024).

fewstep hands the denoiser latents as images (B, C, H, W); FLUX.1 reads them as a token sequence: 2x2 patches
packed into C*4 channels (FluxPipeline._pack_latents), rotary positions from ``img_ids`` (row, column of each
patch) and ``txt_ids`` (zeros for the T5 tokens). The transformer receives sigma = t / 1000 and predicts the
flow velocity u = eps - x0, as SD3.

FLUX.1 [dev] is guidance-distilled: it has no classifier-free guidance at inference, the guidance scale is an
input (``guidance_embeds``; FluxPipeline passes ``guidance_scale``, default 3.5). This denoiser takes a guidance w
through that input and runs once; with ``guidance=None`` it uses ``default_guidance`` (3.5, FluxPipeline's
default, and the embedded guidance NVlabs/FastGen's FLUX.1 DMD2 gives teacher, fake score and student alike:
fastgen/networks/Flux/network.py, ``guidance_scale=3.5``). FLUX.1 [schnell] has no such input: there a guidance
w != 1 is true classifier-free guidance over the empty prompt (FluxPipeline's ``true_cfg_scale``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..schedules import Schedule
from .base import Cond, Denoiser

#: FluxPipeline's default ``guidance_scale`` (the embedded guidance of FLUX.1 [dev])
FLUX_GUIDANCE = 3.5


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4 C): 2x2 patches as tokens, FluxPipeline's order."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of ``pack`` for latents of side (h, w)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary position ids of the packed patches of an (h, w) latent: (h/2 * w/2, 3) = (0, row, column)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], 1).to(dtype)


class FluxDenoiser(Denoiser):
    """Wraps a FluxTransformer2DModel. Condition keys: ``encoder_hidden_states`` (T5), ``pooled_projections`` (CLIP).

    Args:
        transformer: the FluxTransformer2DModel.
        schedule: its flow schedule, shifted for the image size it runs at (FlowSchedule.for_sequence).
        sample_shape: the unpacked latent shape (C, H, W) at that size.
        default_guidance: the embedded guidance used when a call passes none ([dev] only).
    """

    cond_keys = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, transformer: nn.Module, schedule: Schedule, prediction_type: str = "flow", *,
                 sample_shape: tuple[int, int, int], default_guidance: float = FLUX_GUIDANCE, **kwargs) -> None:
        super().__init__(schedule, prediction_type, sample_shape=sample_shape, **kwargs)
        self.net = transformer
        self.default_guidance = float(default_guidance)
        #: [dev]'s guidance embedding (read once: a DDP or FSDP wrapper around the network hides its config)
        self.guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))

    @property
    def takes_guidance(self) -> bool:
        return self.guidance_embeds

    def guidance_input(self, w: Tensor) -> Tensor:
        return w.float()

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        """FluxPipeline's schedulers draw step noise on the packed latents (FlowMatchLCMScheduler.step): drawn so, then
        unpacked, the same generator gives the same sample."""
        b, c, h, w = shape
        return unpack(torch.randn((b, (h // 2) * (w // 2), c * 4), generator=generator, dtype=torch.float32), h, w)

    def network_output(self, x_t: Tensor, t: Tensor, cond: Cond | None, timestep_cond: Tensor | None) -> Tensor:
        dtype = self.net_dtype
        cond = {k: v.to(dtype) for k, v in (cond or {}).items()}
        text = cond["encoder_hidden_states"]
        h, w = x_t.shape[-2:]
        out = self.net(
            hidden_states=pack(x_t.to(dtype)),
            timestep=(t.float() / self.schedule.num_train_timesteps).to(dtype),
            guidance=None if timestep_cond is None else timestep_cond.to(dtype),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=image_ids(h, w, x_t.device, dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)
