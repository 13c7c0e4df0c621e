"""Noise schedules (VP/DDPM and rectified flow) and conversions between parameterizations.

One time convention for all of fewstep (docs/concepts.md): ``t`` is the timestep a diffusers
model receives, and noise grows with ``t``.

- VP (DDPM, Ho et al. 2020; SD 1.x/2.x, SDXL): ``t`` in [0, T-1] indexes the table of
  alphā; ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t = sqrt(alphā_t)``,
  ``sigma_t = sqrt(1 - alphā_t)``. Any ``t < 0`` is the clean end of sampling (alphā =
  ``final_alpha_cumprod``, 1 unless the scheduler config says ``set_alpha_to_one: false``),
  exactly as diffusers' DDIM treats a previous timestep below zero.
- Rectified flow (Liu et al. 2022; SD3, FlowMatch* schedulers): ``t = T * s`` with ``s`` in [0, 1],
  ``x_t = (1 - s) x0 + s eps``; the velocity ``u = eps - x0`` (diffusers' sign).

Schedule tables are float64; every coefficient handed to a network's output is float32 or
wider, whatever the network's dtype.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .errors import FewstepError, check_choice, lookup

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def wide(v: Tensor) -> Tensor:
    """``v`` in float32, or float64 if it already is (float64 runs stay float64: the sCM tangent tests)."""
    return v if v.dtype == torch.float64 else v.float()


def expand_as(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector (B,) to broadcast against ``x`` (B, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------- conversions
def x0_eps_from_native(
    native: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a network output of ``prediction_type`` at ``x_t = alpha x0 + sigma eps``.

    ``alpha`` and ``sigma`` broadcast against ``x_t``. v-prediction (Salimans & Ho 2022) is
    ``v = alpha eps - sigma x0``; flow velocity is ``u = eps - x0``. The formulas are exact for any
    (alpha, sigma), not only alpha^2 + sigma^2 = 1 or alpha + sigma = 1.
    """
    native, x_t = wide(native), wide(x_t)
    if prediction_type == "epsilon":
        eps = native
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "sample":
        x0 = native
        eps = (x_t - alpha * x0) / sigma
    elif prediction_type == "v_prediction":
        norm = alpha * alpha + sigma * sigma
        x0 = (alpha * x_t - sigma * native) / norm
        eps = (sigma * x_t + alpha * native) / norm
    elif prediction_type == "flow":
        x0 = (x_t - sigma * native) / (alpha + sigma)
        eps = x0 + native
    else:
        check_choice(prediction_type, PREDICTION_TYPES, "prediction type")
        raise AssertionError  # unreachable
    return x0, eps


def native_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """The output a network of ``prediction_type`` should give for this (x0, eps): its training target."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "flow":
        return eps - x0
    check_choice(prediction_type, PREDICTION_TYPES, "prediction type")
    raise AssertionError  # unreachable


# ----------------------------------------------------------------------------- schedules
class Schedule:
    """Maps fewstep time ``t`` to (alpha_t, sigma_t). Subclasses: VPSchedule, FlowSchedule."""

    kind: str
    num_train_timesteps: int
    t_clean: float  # the value of t meaning "clean data" (alpha = 1, sigma = 0 unless configured)

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) as float64 tensors shaped like ``t``."""
        raise NotImplementedError

    def coefficients(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) in float32, shaped to broadcast against ``like`` (B, ...)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        alpha, sigma = self.alpha_sigma(t)
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return expand_as(alpha.to(dtype), like), expand_as(sigma.to(dtype), like)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """x_t = alpha_t x0 + sigma_t eps (computed in float32, returned in x0's dtype)."""
        alpha, sigma = self.coefficients(t, x0)
        return (alpha * x0.float() + sigma * eps.float()).to(x0.dtype)

    def timesteps(self, num_steps: int, spacing: str | None = None, original_steps: int = 50) -> Tensor:
        """Descending sampling timesteps (float64, ``num_steps`` values, the clean end excluded); ``original_steps``
        is LCM's skipping-step grid size for ``spacing: lcm``."""
        raise NotImplementedError

    def sampling_grid(self, num_steps: int, spacing: str | None = None, original_steps: int = 50) -> Tensor:
        """``timesteps(num_steps)`` followed by ``t_clean``: the ``num_steps + 1`` points a sampler visits."""
        ts = self.timesteps(num_steps, spacing, original_steps)
        return torch.cat([ts, torch.tensor([self.t_clean], dtype=torch.float64)])

    # Coordinates in which the probability-flow ODE is simple. VP: y = x / alpha, r = sigma / alpha,
    # dy/dr = eps (Karras et al. 2022, EDM eq. 4 with s(t) = alpha). Flow: y = x, r = s, dy/dr = eps - x0.
    def ode_coords(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
        """(c, r) with y = x / c the ODE state and r the ODE's independent variable."""
        raise NotImplementedError

    def with_clean_end(self) -> "Schedule":
        """This schedule with its clean end at sigma = 0 exactly (it already is, unless a VP table says otherwise)."""
        return self

    def ode_derivative(self, x0: Tensor, eps: Tensor) -> Tensor:
        """dy/dr for the (x0, eps) the denoiser predicts."""
        raise NotImplementedError

    def t_from_ratio(self, r: Tensor) -> Tensor:
        """The t whose sigma_t / alpha_t is ``r`` (the inverse of the noise-to-signal ratio), differentiable in ``r``."""
        raise NotImplementedError


class VPSchedule(Schedule):
    """Discrete variance-preserving schedule (DDPM; Ho et al. 2020) over alphā from a beta table."""

    kind = "vp"
    t_clean = -1.0

    def __init__(
        self,
        alphas_cumprod: np.ndarray | Tensor,
        *,
        final_alpha_cumprod: float = 1.0,
        timestep_spacing: str = "trailing",
        steps_offset: int = 0,
    ) -> None:
        ab = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if ab.ndim != 1 or len(ab) < 2 or not bool(((ab >= 0) & (ab <= 1)).all()):
            raise FewstepError("alphas_cumprod must be a 1-D table of values in [0, 1]")
        self.alphas_cumprod = ab
        self.num_train_timesteps = len(ab)
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.timestep_spacing = check_choice(timestep_spacing, TIMESTEP_SPACINGS, "timestep spacing")
        self.steps_offset = int(steps_offset)

    @classmethod
    def from_betas(
        cls,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        *,
        rescale_betas_zero_snr: bool = False,
        final_alpha_cumprod: float = 1.0,
        timestep_spacing: str = "trailing",
        steps_offset: int = 0,
    ) -> "VPSchedule":
        """Stable Diffusion's schedule by default (scaled_linear, 0.00085 to 0.012, 1000 steps)."""
        betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        ab = np.cumprod(1.0 - betas)
        if rescale_betas_zero_snr:
            ab = rescale_zero_terminal_snr(ab)
        return cls(ab, final_alpha_cumprod=final_alpha_cumprod, timestep_spacing=timestep_spacing, steps_offset=steps_offset)

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        table = self.alphas_cumprod.to(t.device)
        T = self.num_train_timesteps
        tc = t.clamp(0, T - 1)
        lo = tc.floor().long().clamp(max=T - 2)
        frac = tc - lo.to(torch.float64)
        # log alphā is linear between integer t: alphā = alphā[lo] exp(frac (log alphā[lo+1] - log alphā[lo])). Integer t
        # reads the table exactly (exp(0) = 1), and the derivative in t is the segment's slope everywhere, which the
        # continuous-time tangent (sCM, forward-mode AD through this function) needs.
        log_lo, log_hi = (torch.log(table[i].clamp_min(1e-300)) for i in (lo, lo + 1))
        ab = table[lo] * torch.exp(frac * (log_hi - log_lo))
        ab = torch.where(frac == 1, table[lo + 1] + (ab - ab.detach()), ab)  # t = T - 1: the last entry, its slope kept
        ab = torch.where(t < 0, torch.full_like(ab, self.final_alpha_cumprod), ab)
        return ab.sqrt(), (1 - ab).clamp_min(0).sqrt()

    def t_from_ratio(self, r: Tensor) -> Tensor:
        """The t (float64, within [0, T-1]) whose sigma/alpha is ``r``: the inverse of ``alpha_sigma``'s interpolation,
        differentiable in ``r`` (alphā = 1 / (1 + r^2), then the segment of log alphā that holds it)."""
        r = torch.as_tensor(r, dtype=torch.float64)
        log_table = torch.log(self.alphas_cumprod.to(r.device).clamp_min(1e-300))
        target = -torch.log1p(r * r)
        # clamped into the table's range, keeping the derivative (a clamp's would be zero at the range's ends, where a
        # proposal clipped to the range puts its samples)
        target = target + (target.clamp(min=float(log_table[-1]), max=float(log_table[0])) - target).detach()
        # log alphā decreases in t: segment lo holds the target when log_table[lo] >= target >= log_table[lo + 1]
        lo = (torch.searchsorted(-log_table, -target.detach(), right=True) - 1).clamp(0, len(log_table) - 2)
        return lo.to(torch.float64) + (target - log_table[lo]) / (log_table[lo + 1] - log_table[lo])

    def timesteps(self, num_steps: int, spacing: str | None = None, original_steps: int = 50) -> Tensor:
        """Timesteps as diffusers' DDIMScheduler.set_timesteps computes them for the same spacing."""
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise FewstepError(f"num_steps must be in 1..{T}, got {num_steps}")
        spacing = check_choice(spacing or self.timestep_spacing, (*TIMESTEP_SPACINGS, "lcm"), "timestep spacing")
        if spacing == "lcm":
            ts = lcm_timesteps(num_steps, T, original_steps)
        elif spacing == "leading":
            ratio = T // num_steps
            ts = (np.arange(0, num_steps) * ratio).round()[::-1] + self.steps_offset
        elif spacing == "trailing":
            ratio = T / num_steps
            ts = np.round(np.arange(T, 0, -ratio)) - 1
        else:
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        return torch.tensor(ts.copy(), dtype=torch.float64)

    def with_clean_end(self) -> "VPSchedule":
        """A copy whose clean end (t < 0) has alphabar 1, sigma 0: where an ODE solve to the data ends (diffusers'
        DPM-Solver, final_sigmas_type "zero"), not alphabar_0 (set_alpha_to_one false: sigma 0.029 for SD 1.5)."""
        import copy

        other = copy.copy(self)
        other.final_alpha_cumprod = 1.0
        return other

    def ode_coords(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.coefficients(t, like)
        return alpha, sigma / alpha

    def ode_derivative(self, x0: Tensor, eps: Tensor) -> Tensor:
        return eps


#: FLUX.1's dynamic-shift parameters where a config leaves them out (diffusers' FlowMatchEulerDiscreteScheduler defaults)
DYNAMIC_SHIFT = {"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
                 "time_shift_type": "exponential"}


class FlowSchedule(Schedule):
    """Rectified-flow schedule x_t = (1 - s) x0 + s eps with t = T s (Liu et al. 2022; Esser et al. 2024).

    ``shift`` only changes the sampling grid (s -> shift s / (1 + (shift - 1) s), as SD3), not the model.
    ``dynamic`` (FLUX.1's resolution-dependent shifting, diffusers' ``use_dynamic_shifting``): the grid is shifted by
    mu, interpolated linearly in the image's token count between ``base_seq_len`` -> ``base_shift`` and
    ``max_seq_len`` -> ``max_shift`` (diffusers' ``calculate_shift``); ``for_sequence(n)`` fixes it for one size.
    ``pipeline_sigmas``: the grid FluxPipeline hands its scheduler (``sigmas = linspace(1, 1/n, n)``, then shifted),
    not the scheduler's own (linspace from sigma_max to sigma_min); a dynamic shift implies it.
    """

    kind = "flow"
    t_clean = 0.0

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, dynamic: Mapping[str, Any] | None = None,
                 mu: float | None = None, pipeline_sigmas: bool = False) -> None:
        if shift <= 0:
            raise FewstepError(f"shift must be positive, got {shift}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.dynamic = {**DYNAMIC_SHIFT, **dynamic} if dynamic is not None else None
        if self.dynamic is not None:
            check_choice(self.dynamic["time_shift_type"], ("exponential", "linear"), "time_shift_type")
        self.mu = mu
        self.pipeline_sigmas = bool(pipeline_sigmas) or self.dynamic is not None

    def with_pipeline_sigmas(self) -> "FlowSchedule":
        """This schedule on FluxPipeline's grid (``pipeline_sigmas``)."""
        return FlowSchedule(self.num_train_timesteps, self.shift, self.dynamic, self.mu, pipeline_sigmas=True)

    def mu_for(self, seq_len: int) -> float:
        """FLUX.1's mu for an image of ``seq_len`` tokens (diffusers' ``calculate_shift``)."""
        d = self.dynamic or DYNAMIC_SHIFT
        m = (d["max_shift"] - d["base_shift"]) / (d["max_seq_len"] - d["base_seq_len"])
        return seq_len * m + (d["base_shift"] - m * d["base_seq_len"])

    def for_sequence(self, seq_len: int) -> "FlowSchedule":
        """This schedule with its resolution-dependent shift fixed for images of ``seq_len`` tokens."""
        if self.dynamic is None:
            raise FewstepError("for_sequence: this flow schedule has a static shift (no use_dynamic_shifting)")
        return FlowSchedule(self.num_train_timesteps, self.shift, self.dynamic, self.mu_for(seq_len), self.pipeline_sigmas)

    def _dynamic_shifted(self, s: np.ndarray) -> np.ndarray:
        mu = self.mu
        if self.dynamic["time_shift_type"] == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        return mu / (mu + (1 / s - 1))

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        s = (torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps).clamp(0, 1)
        return 1 - s, s

    def t_from_ratio(self, r: Tensor) -> Tensor:
        """The t whose sigma/alpha = s / (1 - s) is ``r`` (float64): s = r / (1 + r)."""
        r = torch.as_tensor(r, dtype=torch.float64)
        return self.num_train_timesteps * r / (1 + r)

    def shifted(self, s: np.ndarray) -> np.ndarray:
        return self.shift * s / (1 + (self.shift - 1) * s)

    def timesteps(self, num_steps: int, spacing: str | None = None, original_steps: int = 50) -> Tensor:
        """Timesteps as diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps computes them (static shift)."""
        if num_steps < 1:
            raise FewstepError(f"num_steps must be at least 1, got {num_steps}")
        if spacing not in (None, "linspace", "lcm"):
            raise FewstepError(f"unknown timestep spacing {spacing!r} for a flow schedule; valid: linspace, lcm")
        T = self.num_train_timesteps
        if spacing == "lcm":  # the skipping-step grid in flow time t = 1000 s (consistency students)
            return torch.tensor(lcm_timesteps(num_steps, T, original_steps), dtype=torch.float64)
        if self.pipeline_sigmas:  # FluxPipeline's grid: sigmas linspace(1, 1/n, n), shifted by mu or statically
            if self.dynamic is not None and self.mu is None:
                raise FewstepError("this flow schedule shifts with the resolution (use_dynamic_shifting): its timesteps "
                                   "need the image's token count; use schedule.for_sequence(num_tokens)")
            sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
            s = self._dynamic_shifted(sigmas) if self.dynamic is not None else self.shifted(sigmas)
            return torch.tensor(s * T, dtype=torch.float64)
        s_min = float(self.shifted(np.array(1.0 / T)))
        s = self.shifted(np.linspace(1.0, s_min, num_steps))
        return torch.tensor(s * T, dtype=torch.float64)

    def ode_coords(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
        _, sigma = self.coefficients(t, like)
        return torch.ones_like(sigma), sigma

    def ode_derivative(self, x0: Tensor, eps: Tensor) -> Tensor:
        return eps - x0


# ----------------------------------------------------------------------------- beta tables
def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_steps: int = 50) -> np.ndarray:
    """LCM's sampling timesteps (Luo et al. 2023; diffusers' LCMScheduler.set_timesteps): ``num_steps``
    points of the skipping-step grid t_n = (n + 1) T / N - 1, evenly spaced from the noise end."""
    if not 1 <= num_steps <= original_steps:
        raise FewstepError(f"num_steps must be in 1..{original_steps} for lcm spacing, got {num_steps}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.float64)


def make_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """Beta tables as diffusers defines them (float64 here)."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine schedule

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)
    check_choice(beta_schedule, BETA_SCHEDULES, "beta schedule")
    raise AssertionError  # unreachable


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1."""
    root = np.sqrt(alphas_cumprod)
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return root**2


# ----------------------------------------------------------------------------- from diffusers configs
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """A Schedule from any diffusers scheduler config (DDPM, DDIM, PNDM, LCM, Euler, DPM-Solver, FlowMatch...)."""
    config = dict(config)
    name = config.get("_class_name", "")
    T = int(config.get("num_train_timesteps", 1000))
    if name in FLOW_SCHEDULERS or name.startswith("FlowMatch"):
        dynamic = None
        if config.get("use_dynamic_shifting"):
            unsupported = [k for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                           if config.get(k)]
            if unsupported:
                raise FewstepError(f"{name} with use_dynamic_shifting and {', '.join(unsupported)} is not supported")
            names = {"base_seq_len": "base_image_seq_len", "max_seq_len": "max_image_seq_len"}
            dynamic = {k: config[names.get(k, k)] for k in DYNAMIC_SHIFT if names.get(k, k) in config}
        return FlowSchedule(T, shift=float(config.get("shift", 1.0)), dynamic=dynamic)
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    else:
        betas = make_betas(
            config.get("beta_schedule", "linear"),
            float(config.get("beta_start", 0.0001)),
            float(config.get("beta_end", 0.02)),
            T,
        )
    ab = np.cumprod(1.0 - betas)
    if config.get("rescale_betas_zero_snr", False):
        ab = rescale_zero_terminal_snr(ab)
    final = 1.0 if config.get("set_alpha_to_one", True) else float(ab[0])
    return VPSchedule(
        ab,
        final_alpha_cumprod=final,
        timestep_spacing=config.get("timestep_spacing", "leading"),
        steps_offset=int(config.get("steps_offset", 0)),
    )


def prediction_type_from_config(config: Mapping[str, Any]) -> str:
    """The network's output type named by a scheduler config ("flow" for FlowMatch schedulers)."""
    name = config.get("_class_name", "")
    if name.startswith("FlowMatch"):
        return "flow"
    return check_choice(config.get("prediction_type", "epsilon"), PREDICTION_TYPES[:3], "prediction type")


SCHEDULES = {"vp": VPSchedule.from_betas, "flow": FlowSchedule}


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by name ("vp" or "flow") with plain keyword arguments."""
    return lookup(SCHEDULES, name, "schedule")(**kwargs)
