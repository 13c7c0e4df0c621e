"""Continuous-time consistency distillation (sCM; Lu & Song 2025, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", Algorithm 1 with consistency distillation).

Per sample, in TrigFlow coordinates (fewstep.denoisers.trigflow):
  tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d)            (log-normal proposal over sigma_d tan t)
  x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I)
  dx_t/dt = sigma_d F_teacher(x_t, t) with CFG weight w              (the teacher's PF-ODE velocity, no grad)
  F^-, cos t sin t dF^-/dt = JVP of F_theta^- along (cos t sin t dx_t/dt, cos t sin t)   (forward-mode AD, no grad)
  g = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF^-/dt)  (r: tangent warm-up, 0 -> 1)
  g = g / (||g|| + c)                                                 (tangent normalization, c = 0.1)
  loss = prior(t) e^{-logvar(t)} mean((F_theta - F^- - g)^2) + logvar(t)   (adaptive weighting, logvar = -w_phi)
The gradient is the paper's: at theta = theta^-, d loss / d theta = -2 prior e^{-logvar} g . dF_theta/dtheta / D.

Forward-mode AD needs two work-arounds on today's torch, both applied only inside the JVP: CPU's default
scaled-dot-product attention kernel has no forward derivative (the math backend is used; it costs more), and
group_norm's forward derivative fails on non-contiguous inputs (UNet2DModel's mid-block attention hands it one; a
contiguous copy is made first). The JVP also runs outside autocast (in float32): autocast casts the weights of a
dual-tensor op but not its tangent.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as nnF
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..denoisers.trigflow import INTERMEDIATE_T_HAT, T_HAT_EDGE, TrigFlowView, trig_coefficients, trig_range
from ..errors import FewstepError, check_choice
from ..rng import SampleRNG
from ..schedules import expand_as
from .base import DistillationLoss, LossOutput, Models

TANGENT_NORMS = ("rms", "full")


# ----------------------------------------------------------------------------- forward-mode AD
class _ContiguousGroupNorm(TorchFunctionMode):
    """group_norm's forward-mode derivative needs a contiguous input (torch 2.13); give it one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is nnF.group_norm and args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
            args = (args[0].contiguous(), *args[1:])
        return func(*args, **(kwargs or {}))


def has_group_norm(network: nn.Module) -> bool:
    """Whether ``network`` holds a GroupNorm, i.e. needs the contiguous-input guard under forward-mode AD."""
    return any(isinstance(m, nn.GroupNorm) for m in network.modules())


@contextmanager
def forward_ad_safe(contiguous_group_norm: bool = True) -> Iterator[None]:
    """The math attention backend (the only one with a forward derivative) and, if asked, contiguous group_norm
    inputs. The guard is a TorchFunctionMode, which sees every torch call: on the ring's MLP it costs 5-9% of
    the JVP (benchmarks/scm_jvp_cost.py), so a network without GroupNorm goes without it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), (_ContiguousGroupNorm() if contiguous_group_norm else nullcontext()):
        yield


def jvp(fn: Callable[[Tensor, Tensor], Tensor], primals: tuple[Tensor, Tensor],
        tangents: tuple[Tensor, Tensor], *, contiguous_group_norm: bool = True) -> tuple[Tensor, Tensor]:
    """(fn(x, t), d/de fn(x + e v_x, t + e v_t) at e = 0) by forward-mode AD, without gradients to parameters;
    ``contiguous_group_norm=False`` skips the group_norm guard (for a network without GroupNorm: ``has_group_norm``)."""
    device = primals[0].device.type
    # outside autocast: autocast casts a dual tensor's weights but not its tangent ("input type float, weight type
    # bfloat16" on CPU), so the JVP runs in the inputs' precision
    with (torch.no_grad(), torch.autocast(device, enabled=False), fwAD.dual_level(),
          forward_ad_safe(contiguous_group_norm)):
        out = fn(*(fwAD.make_dual(p, v.to(p.dtype)) for p, v in zip(primals, tangents)))
        primal, tangent = fwAD.unpack_dual(out)
    if tangent is None:  # fn does not depend on its inputs
        tangent = torch.zeros_like(primal)
    return primal, tangent


# ----------------------------------------------------------------------------- the objective's pieces
def scm_tangent(F_minus: Tensor, F_jvp: Tensor, x_t: Tensor, dxt_dt: Tensor, t: Tensor, sigma_data: float,
                r: float = 1.0) -> Tensor:
    """g = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t x_t - r sigma_d F_jvp, with F_jvp = cos t sin t dF^-/dt
    (sCM Algorithm 1, "JVP rearrangement"); g = cos t df^-/dt when r = 1."""
    cos, sin = trig_coefficients(t, x_t)
    return -cos * cos * (sigma_data * F_minus - dxt_dt) - r * (cos * sin * x_t + sigma_data * F_jvp)


def normalize_tangent(g: Tensor, c: float, kind: str = "rms") -> Tensor:
    """g / (||g|| + c) per sample (sCM sec. 4.2); ``rms`` divides the norm by sqrt(D) (FastGen's
    g_norm_spatial_invariance, so c means the same at every resolution), ``full`` is the paper's plain norm."""
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    if kind == "rms":
        norm = norm / math.sqrt(g[0].numel())
    return g / expand_as(norm + c, g)


class AdaptiveWeight(nn.Module):
    """logvar(t) = -w_phi(t) (sCM sec. 4.2; EDM2's uncertainty head, Karras et al. 2024): a linear map of fixed
    random Fourier features of c_noise = log(sigma_d tan t) / 4, initialised to zero (weight 1 at the start)."""

    def __init__(self, features: int = 128, sigma_data: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(features, generator=g, dtype=torch.float64))
        self.register_buffer("phases", torch.rand(features, generator=g, dtype=torch.float64))
        self.sigma_data = sigma_data
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        c_noise = torch.log(self.sigma_data * torch.tan(t.double())) / 4
        feats = math.sqrt(2) * torch.cos(2 * math.pi * (c_noise[:, None] * self.freqs + self.phases))
        # sum over the one output, not squeeze: a view out of an FSDP2 unit would lose its pre-backward hook
        return self.linear(feats.to(self.linear.weight.dtype)).sum(-1)


# ----------------------------------------------------------------------------- the loss
class SCMLoss(DistillationLoss):
    """sCM consistency distillation of a teacher into a student that samples in 1-4 steps (denoise, re-noise).

    Args (defaults: sCM's CIFAR-10 settings, Appendix G.2, and NVlabs/FastGen fastgen/configs/methods/config_scm.py):
        sigma_data: TrigFlow's data scale (0.5).
        p_mean, p_std: the log-normal proposal over sigma_d tan t (-1.0, 1.4).
        tangent_warmup_steps: H, student updates over which r ramps from 0 to 1 (FastGen: 10000).
        tangent_c: c of the tangent normalization (0.1).
        tangent_norm: "rms" (FastGen's default) or "full" (the paper's ||g||).
        prior_weighting: multiply by 1 / (sigma_d tan t) (FastGen's prior_weighting_enabled: 1 / sigma_t).
        guidance_min, guidance_max: the teacher's CFG weight range, diffusers' convention, drawn per sample;
            None: no guidance. A student with a guidance embedding receives w; one without learns the guided teacher.
        weight_features: Fourier features of the adaptive weight network (EDM2: 128).
        intermediate_t: the two-step sampler's middle TrigFlow time (not used in training): diffusers'
            SCMScheduler ``intermediate_timesteps`` (1.3, SANA-Sprint's); FastGen's CIFAR-10 sCD recommends
            sigma 0.821, i.e. arctan(0.821 / 0.5) = 1.02 (fastgen/configs/experiments/EDM/config_scd_cifar10.py).
    """

    provided = ("weighting", "t_range")
    groups = ("weighting",)
    choices = {"tangent_norm": TANGENT_NORMS}

    def __init__(self, *, sigma_data: float = 0.5, p_mean: float = -1.0, p_std: float = 1.4,
                 tangent_warmup_steps: int = 10000, tangent_c: float = 0.1, tangent_norm: str = "rms",
                 prior_weighting: bool = True, guidance_min: float | None = None, guidance_max: float | None = None,
                 weight_features: int = 128, intermediate_t: float = INTERMEDIATE_T_HAT, weighting: AdaptiveWeight | None = None,
                 t_range: tuple[float, float] = (T_HAT_EDGE, math.pi / 2 - T_HAT_EDGE)) -> None:
        super().__init__()
        if sigma_data <= 0 or p_std <= 0 or tangent_c < 0:
            raise FewstepError(f"sigma_data and p_std must be positive and tangent_c >= 0 (got {sigma_data}, {p_std}, "
                               f"{tangent_c})")
        if not 0 < intermediate_t < math.pi / 2:
            raise FewstepError(f"intermediate_t must lie in (0, pi/2), a TrigFlow time; got {intermediate_t}")
        if tangent_warmup_steps < 0:
            raise FewstepError(f"tangent_warmup_steps must be >= 0, got {tangent_warmup_steps}")
        if (guidance_min is None) != (guidance_max is None) or (guidance_min is not None and guidance_min > guidance_max):
            raise FewstepError(f"set guidance_min <= guidance_max (or neither); got {guidance_min}, {guidance_max}")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        self.warmup, self.c = int(tangent_warmup_steps), float(tangent_c)
        self.tangent_norm = check_choice(tangent_norm, TANGENT_NORMS, "tangent_norm")
        self.prior_weighting = bool(prior_weighting)
        self.guidance = None if guidance_min is None else (float(guidance_min), float(guidance_max))
        self.intermediate_t = float(intermediate_t)
        self.weighting = weighting if weighting is not None else AdaptiveWeight(weight_features, sigma_data)
        self.t_range = (float(t_range[0]), float(t_range[1]))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64), persistent=False)

    @classmethod
    def from_models(cls, models: Models, **settings: Any) -> "SCMLoss":
        s = cls.settings(**settings)
        if models.teacher is None:
            raise FewstepError("sCM distillation needs a teacher (teacher.kind is none): its velocity is the tangent")
        return cls(t_range=trig_range(models.student.schedule, s["sigma_data"]), **s)

    # ------------------------------------------------------------------ protocol
    def trains(self) -> dict[str, str]:
        return {"weighting": "weighting"}

    def phase_modules(self, phase: str) -> tuple[str, ...]:
        return ("student", "weighting")  # (theta, phi) updated together (Algorithm 1)

    def sampler_settings(self) -> dict[str, Any]:
        """The TrigFlow grid's sigma_d and two-step middle time (``spacing: trigflow``: t = pi/2 clipped to the
        schedule, then ``intermediate_t`` for two steps)."""
        return {"sigma_data": self.sigma_data, "intermediate_t": self.intermediate_t}

    # ------------------------------------------------------------------ a step
    def draws(self, rng: SampleRNG, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor | None]:
        """(t, z, w) per sample: the log-normal time clipped to the schedule's range, z ~ N(0, sigma_d^2 I), CFG w.
        tau and z come from one normal draw per sample (its first entry is tau's): half the per-sample generator
        calls (the ring's draws 2.8 -> 2.0 ms of a 10 ms update); below 16 entries torch fills a CPU normal draw in
        sequence, so there the values are those of two separate draws."""
        e = rng.randn(1 + math.prod(shape))
        tau = self.p_mean + self.p_std * e[:, 0]
        t = torch.atan(torch.exp(tau.double()) / self.sigma_data).clamp(*self.t_range)
        z = self.sigma_data * e[:, 1:].reshape(len(rng), *shape)
        w = rng.uniform(*self.guidance) if self.guidance is not None else None
        return t, z, w

    def warmup_ratio(self) -> float:
        """r = min(1, iteration / H) (tangent warm-up)."""
        return 1.0 if self.warmup == 0 else min(1.0, int(self.iteration) / self.warmup)

    def forward(self, phase, batch, student, teacher):
        x0 = batch["x0"].float()
        t, z, w = self.draws(SampleRNG(batch["seeds"], x0.device), tuple(x0.shape[1:]))
        cond = student.batch_cond(batch)
        cos, sin = trig_coefficients(t, x0)
        x_t = cos * x0 + sin * z
        with torch.no_grad():
            guided = w if (cond is not None and teacher.null_cond is not None) else None
            dxt_dt = TrigFlowView(teacher, self.sigma_data).velocity(x_t, t, cond, guidance=guided)
        view = TrigFlowView(student, self.sigma_data)
        gs = w if student.takes_guidance else None

        def F_of(x: Tensor, tt: Tensor) -> Tensor:
            return view.F(x, tt, cond, guidance=gs)

        scale = (torch.cos(t) * torch.sin(t)).float()
        F_minus, F_jvp = jvp(F_of, (x_t, t), (expand_as(scale, x_t) * dxt_dt, scale.double()),
                             contiguous_group_norm=has_group_norm(student))
        r = self.warmup_ratio()
        g = normalize_tangent(scm_tangent(F_minus, F_jvp, x_t, dxt_dt, t, self.sigma_data, r), self.c, self.tangent_norm)
        F_theta = F_of(x_t, t)
        logvar = self.weighting(t).float()
        per_sample = (F_theta - F_minus - g).square().flatten(1).mean(1)
        prior = 1.0 / (self.sigma_data * torch.tan(t)).float() if self.prior_weighting else torch.ones_like(logvar)
        loss = (prior * torch.exp(-logvar) * per_sample + logvar).mean()
        return LossOutput(loss, {"loss": loss.detach(), "scm_unweighted": per_sample.mean().detach(),
                                 "logvar": logvar.mean().detach(), "tangent_warmup": r})

    # ------------------------------------------------------------------ state
    def on_step_end(self, phase: str, student) -> None:
        self.iteration += 1

    def extra_state(self) -> dict[str, Tensor]:
        return {"iteration": self.iteration.detach().clone()}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"iteration"}:
            raise FewstepError(f"checkpoint's sCM state has keys {sorted(state)}; expected ['iteration']")
        self.iteration.fill_(int(state["iteration"]))
