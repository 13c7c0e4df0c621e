"""Encoder propagation: training-free reuse of a UNet's encoder features across adjacent sampling steps.

Li et al., "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models" (arXiv 2312.09608, NeurIPS
2024): the encoder's features (conv_in, the down blocks and the mid block) change little between adjacent steps,
the decoder's (up blocks) a lot. At key steps the whole UNet runs and the encoder's skip features and mid-block
output are kept; at the other steps only the decoder runs, on the kept features and the current step's time
embedding. Key steps, counted from the first step: the authors' default [0, 1, 2, 3, 5, 10, 15, 25, 35] (their
code's `utils_sd.py`, `register_faster_forward`; for 50 DDIM steps `mod="50ls"` keeps [0, 1, 2, 3, 5, 10, 15]).
Their prior-noise injection and parallel batching of non-key steps are not implemented here.

It changes the samples (an approximation): off by default, and its quality cost is measured in
benchmarks/pairs_throughput.py. ``EncoderPropagation`` is passed in place of the UNet to the code that samples
(a Denoiser built on it); the UNet itself is not modified.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import FewstepError

#: Faster Diffusion's default key steps (indices into the sampling grid, from its first step)
PAPER_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def key_timesteps(grid: list[float] | Tensor, key_steps=PAPER_KEY_STEPS) -> set[float]:
    """The timesteps of ``grid`` (a sampler's steps, noisiest first) at which the encoder runs."""
    values = [_as_key(t) for t in grid]
    return {values[i] for i in key_steps if i < len(values)}


def _as_key(t) -> float:
    """A timestep as the network sees it: float32 (UNetDenoiser casts), so a float64 grid value still matches."""
    return float(torch.as_tensor(t, dtype=torch.float32))


class EncoderPropagation(nn.Module):
    """A diffusers UNet2DModel / UNet2DConditionModel whose encoder runs only at ``keys`` (timestep values; the
    first call, and any call whose batch differs from the kept features', runs it too). ``encoder_runs`` and
    ``calls`` count what happened."""

    def __init__(self, unet: nn.Module, keys: set[float]) -> None:
        super().__init__()
        name = type(unet).__name__
        if name not in ("UNet2DModel", "UNet2DConditionModel"):
            raise FewstepError(f"encoder propagation works on UNet2DModel and UNet2DConditionModel, not {name}")
        cfg = unet.config
        unsupported = [k for k in ("addition_embed_type", "class_embed_type", "time_embedding_type")
                       if getattr(cfg, k, None) not in (None, "positional", "text_time")]
        if unsupported or getattr(cfg, "center_input_sample", False):
            raise FewstepError(f"encoder propagation does not support this UNet's {', '.join(unsupported) or 'center_input_sample'}")
        self.unet, self.keys = unet, {_as_key(k) for k in keys}
        self.config = cfg
        self.kept: tuple[tuple[Tensor, ...], Tensor] | None = None
        self.calls = self.encoder_runs = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _embedding(self, sample: Tensor, timestep: Tensor, class_labels, timestep_cond, encoder_hidden_states,
                   added_cond_kwargs) -> Tensor:
        u = self.unet
        if type(u).__name__ == "UNet2DModel":
            t = timestep if timestep.ndim else timestep[None]
            t = t.to(sample.device) * torch.ones(sample.shape[0], dtype=t.dtype, device=sample.device)
            emb = u.time_embedding(u.time_proj(t).to(dtype=u.dtype))
            if u.class_embedding is not None:
                emb = emb + u.class_embedding(class_labels).to(dtype=u.dtype)
            return emb
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = u.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if u.config.class_embeddings_concat else emb + class_emb
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug if aug is not None else emb
        return u.time_embed_act(emb) if u.time_embed_act is not None else emb

    def _encoder(self, sample: Tensor, emb: Tensor, ctx) -> tuple[tuple[Tensor, ...], Tensor]:
        u = self.unet
        sample = u.conv_in(sample)
        skips: tuple[Tensor, ...] = (sample,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=ctx)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                sample = u.mid_block(sample, emb, encoder_hidden_states=ctx)
            else:
                sample = u.mid_block(sample, emb)
        return skips, sample

    def _decoder(self, skips: tuple[Tensor, ...], sample: Tensor, emb: Tensor, ctx) -> Tensor:
        u = self.unet
        for block in u.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ctx)
            elif type(u).__name__ == "UNet2DModel":
                sample = block(sample, res, emb)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res)
        if u.conv_norm_out is not None:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None,
                class_labels: Tensor | None = None, timestep_cond: Tensor | None = None,
                added_cond_kwargs: dict | None = None, return_dict: bool = True):
        timestep = torch.as_tensor(timestep, device=sample.device)
        emb = self._embedding(sample, timestep, class_labels, timestep_cond, encoder_hidden_states, added_cond_kwargs)
        ctx = encoder_hidden_states
        if ctx is not None and getattr(self.unet, "encoder_hid_proj", None) is not None:
            ctx = self.unet.process_encoder_hidden_states(encoder_hidden_states=ctx, added_cond_kwargs=added_cond_kwargs)
        t0 = _as_key(timestep.reshape(-1)[0])
        self.calls += 1
        if self.kept is None or t0 in self.keys or self.kept[1].shape[0] != sample.shape[0]:
            self.kept = self._encoder(sample, emb, ctx)
            self.encoder_runs += 1
        out = self._decoder(*self.kept, emb, ctx)
        return (out,) if not return_dict else type("Output", (), {"sample": out})()


__all__ = ["EncoderPropagation", "PAPER_KEY_STEPS", "key_timesteps"]
