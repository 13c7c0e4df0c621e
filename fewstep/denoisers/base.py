"""The Denoiser: every model answers "what is x0?" for (x_t, t, condition).

Design after k-diffusion's wrappers and EDM's preconditioning (Karras et al. 2022): the wrapper
owns the parameterization, so losses and solvers only see x0_hat (or, on request, the network's
native output: eps, v, x0 or flow velocity).

Classifier-free guidance (Ho & Salimans 2022) uses diffusers' convention everywhere:
``pred = pred_u + w (pred_c - pred_u)``, so w = 1 is the plain conditional prediction. LCM writes
``pred_c + w' (pred_c - pred_u)`` with ``w' = w - 1``. Both branches run in one batched forward
over ``[uncond; cond]``. A network with a guidance input (``takes_guidance``) runs once instead: LCM's
``time_cond_proj_dim`` gets an embedding of ``w - 1``, FLUX.1 [dev]'s ``guidance_embeds`` gets w itself.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import FewstepError, check_choice
from ..schedules import PREDICTION_TYPES, Schedule, expand_as, native_from_x0_eps, wide, x0_eps_from_native

Cond = Mapping[str, Tensor]
Guidance = float | Tensor | None


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of 1000 w (LCM, Luo et al. 2023; diffusers' get_guidance_scale_embedding).

    ``w`` is LCM's guidance (a pipeline's guidance_scale - 1), shape (B,); returns (B, dim) float32.
    """
    w = w.float().reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def _batch(v: Tensor | float, n: int, device: torch.device) -> Tensor:
    v = torch.as_tensor(v, device=device)
    return v.expand(n) if v.ndim == 0 else v


def _stack_cond(uncond: Cond, cond: Cond, n: int) -> dict[str, Tensor]:
    if set(uncond) != set(cond):
        raise FewstepError(f"unconditional keys {sorted(uncond)} differ from conditional keys {sorted(cond)}")
    out = {}
    for k, c in cond.items():
        u = uncond[k].to(c.device)
        if u.shape[0] == 1 and n != 1:
            u = u.expand(n, *u.shape[1:])
        out[k] = torch.cat([u, c])
    return out


class Denoiser(nn.Module):
    """Base class: subclasses implement ``network_output`` (the raw network call) and ``cond_keys``.

    Args:
        schedule: the noise schedule the network was trained on.
        prediction_type: what the network outputs: epsilon, v_prediction, sample or flow.
        null_cond: the condition meaning "no condition" (empty-prompt embeddings, the null class),
            batch size 1; needed for classifier-free guidance.
        guidance_embedding_dim: width of the network's guidance embedding input, if it has one.
        sample_shape: the shape of one sample the network takes, where the network alone does not say it (a
            pipeline's latents at the size it runs: ``LoadedPipeline.wrap``); None otherwise.
    """

    cond_keys: tuple[str, ...] = ()

    def __init__(
        self,
        schedule: Schedule,
        prediction_type: str,
        *,
        null_cond: Cond | None = None,
        guidance_embedding_dim: int | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else None
        self.schedule = schedule
        self.prediction_type = check_choice(prediction_type, PREDICTION_TYPES, "prediction type")
        self.null_cond = dict(null_cond) if null_cond is not None else None
        self.guidance_embedding_dim = guidance_embedding_dim

    #: the guidance a network with a guidance input gets when a call passes none (1: unguided, LCM's w' = 0)
    default_guidance = 1.0

    @property
    def takes_guidance(self) -> bool:
        """Whether the network takes the guidance scale as an input (and runs once) instead of two CFG branches."""
        return self.guidance_embedding_dim is not None

    def guidance_input(self, w: Tensor) -> Tensor:
        """What the network's guidance input receives for guidance ``w`` (B,): LCM's embedding of w - 1."""
        return guidance_embedding(w - 1.0, self.guidance_embedding_dim)

    @property
    def net_dtype(self) -> torch.dtype:
        """The network's parameter dtype (its first parameter's; cheaper than diffusers' ``.dtype``)."""
        return next(self.net.parameters()).dtype

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond | None, timestep_cond: Tensor | None) -> Tensor:
        """``network_output``; a half-precision network (a teacher in train.teacher_dtype) runs outside
        autocast, which on CPU would otherwise mix its fp16 weights with bf16 activations."""
        if hasattr(self, "net") and torch.is_autocast_enabled(x_t.device.type) and self.net_dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(x_t.device.type, enabled=False):
                return self.network_output(x_t, t, cond, timestep_cond)
        return self.network_output(x_t, t, cond, timestep_cond)

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        """Standard normal noise of ``shape`` (float32, CPU), in the order the family's diffusers pipeline draws a
        scheduler step's noise from the same generator (FluxDenoiser: the packed token layout)."""
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    # ------------------------------------------------------------------ to implement
    def network_output(self, x_t: Tensor, t: Tensor, cond: Cond | None, timestep_cond: Tensor | None) -> Tensor:
        """The network's raw output for a batch (any dtype); ``t`` is fewstep time, shape (B,)."""
        raise NotImplementedError

    def trigflow_F(self, x_hat: Tensor, t_hat: Tensor, sigma_data: float, cond: Cond | None) -> Tensor | None:
        """F(x_hat / sigma_d, t_hat) in TrigFlow coordinates (fewstep.denoisers.trigflow), unguided, computed directly
        where the preconditioning is TrigFlow's up to a change of variables; None (here): the caller goes through
        the native point instead (``TrigFlowView``), which gives the same value."""
        return None

    # ------------------------------------------------------------------ public
    def batch_cond(self, batch: Mapping) -> dict | None:
        """The condition tensors of ``batch`` this denoiser takes (``cond_keys``), or None when there are none."""
        return {k: batch[k] for k in self.cond_keys if k in batch} or None

    def check_cond(self, cond: Cond | None) -> None:
        if cond is None:
            return
        unknown = set(cond) - set(self.cond_keys)
        if unknown:
            valid = ", ".join(self.cond_keys) or "none (unconditional model)"
            raise FewstepError(f"unknown condition key(s) {sorted(unknown)} for {type(self).__name__}; valid: {valid}")

    def native(
        self,
        x_t: Tensor,
        t: Tensor | float,
        cond: Cond | None = None,
        *,
        guidance: Guidance = None,
        uncond: Cond | None = None,
    ) -> Tensor:
        """The network's native prediction in float32, with classifier-free guidance applied."""
        self.check_cond(cond)
        n = x_t.shape[0]
        t = _batch(t, n, x_t.device)
        if self.takes_guidance:
            w = _batch(self.default_guidance if guidance is None else guidance, n, x_t.device).float()
            return wide(self._call(x_t, t, cond, self.guidance_input(w)))
        if guidance is None:
            return wide(self._call(x_t, t, cond, None))
        w = _batch(guidance, n, x_t.device).float()
        if bool((w == 1).all()):
            return wide(self._call(x_t, t, cond, None))
        if cond is None:
            raise FewstepError("classifier-free guidance needs a condition (cond is None)")
        uncond = uncond if uncond is not None else self.null_cond
        if uncond is None:
            raise FewstepError(f"{type(self).__name__} has no null condition; set null_cond to use guidance")
        both = self._call(torch.cat([x_t, x_t]), torch.cat([t, t]), _stack_cond(uncond, cond, n), None)
        pred_u, pred_c = wide(both).chunk(2)
        w = expand_as(w, x_t)
        return pred_u + w * (pred_c - pred_u)

    def predict(
        self,
        x_t: Tensor,
        t: Tensor | float,
        cond: Cond | None = None,
        *,
        guidance: Guidance = None,
        uncond: Cond | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) in float32."""
        native = self.native(x_t, t, cond, guidance=guidance, uncond=uncond)
        alpha, sigma = self.schedule.coefficients(t, x_t)
        return x0_eps_from_native(native, x_t, alpha, sigma, self.prediction_type)

    def with_schedule(self, schedule: Schedule) -> "Denoiser":
        """This denoiser, its network shared, under another schedule (a shallow copy)."""
        import copy

        other = copy.copy(self)
        other.schedule = schedule
        return other

    def with_network(self, net: nn.Module) -> "Denoiser":
        """This denoiser calling ``net`` in place of its network (a shallow copy with its own module table; this
        one is left as it is), e.g. fewstep.propagation.EncoderPropagation around the same UNet."""
        import copy

        if "net" not in self._modules:
            raise FewstepError(f"{type(self).__name__} has no network to stand in for")
        other = copy.copy(self)
        other._modules = {**self._modules, "net": net}
        return other

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | float,
        cond: Cond | None = None,
        *,
        guidance: Guidance = None,
        uncond: Cond | None = None,
    ) -> Tensor:
        """x0_hat in float32."""
        return self.predict(x_t, t, cond, guidance=guidance, uncond=uncond)[0]

    def native_target(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """What this network should output for (x0, eps) at t: the denoising training target."""
        alpha, sigma = self.schedule.coefficients(t, x0)
        return native_from_x0_eps(x0.float(), eps.float(), alpha, sigma, self.prediction_type)
