"""A small MLP denoiser for vector data (toy mixtures), saved and loaded like any diffusers model."""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ..errors import check_choice
from ..schedules import Schedule
from .base import Cond, Denoiser

PRECONDITIONINGS = ("none", "edm", "trigflow")


class MLPNet(ModelMixin, ConfigMixin):
    """F(x, c_noise, class) with a Fourier embedding of the noise level; ``num_classes`` adds a null class."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0, embed_dim: int = 64,
                 max_frequency: float = 1000.0):
        super().__init__()
        # frequencies 1 .. max_frequency; a continuous-time consistency student wants a small one (sCM sec. 4.1: a
        # high-frequency time embedding makes the tangent dF/dt, and training, unstable)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_frequency), embed_dim // 2)),
                             persistent=False)
        self.embed = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        args = c_noise.to(self.freqs.dtype)[:, None] * self.freqs[None]
        h_t = self.embed(torch.cat([args.sin(), args.cos()], dim=1))
        if self.class_embed is not None:
            labels = class_labels if class_labels is not None else torch.full_like(c_noise, self.config.num_classes).long()
            h_t = h_t + self.class_embed(labels.long())
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + h_t)
        return self.out(h)


class MLPDenoiser(Denoiser):
    """Denoiser over an MLPNet.

    ``precondition="none"``: the net sees (x_t, t / T) and outputs ``prediction_type`` directly.
    ``precondition="edm"`` (Karras et al. 2022, Table 1): with s = sigma/alpha the VE noise level,
    x0_hat = c_skip(s) x_t/alpha + c_out(s) F(c_in(s) x_t/alpha, log(s)/4), c_skip = sd^2/(s^2+sd^2),
    c_out = s sd / sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2); the native output is then x0 ("sample").
    ``precondition="trigflow"``: the same scalings, which in TrigFlow time t = atan(s / sd) are cos^2 t, sd sin t and
    cos t / sd (x0_hat = cos t x_hat + sd sin t F with x_hat = cos t x_t / alpha the TrigFlow sample: Lu & Song 2025's
    form with F's sign flipped), with the time input c_noise = t itself instead of
    log(s)/4: sCM's stable time conditioning (sec. 4.1), whose derivative dc_noise/dt = 1 stays bounded where
    d log(sd tan t)/dt = 1 / (sin t cos t) grows without bound at both ends, and with it the tangent dF/dt.
    """

    cond_keys = ("class_labels",)

    def __init__(
        self, net: MLPNet, schedule: Schedule, prediction_type: str = "epsilon", *,
        precondition: str = "none", sigma_data: float = 0.5, **kwargs,
    ) -> None:
        self.precondition = check_choice(precondition, PRECONDITIONINGS, "preconditioning")
        if self.precondition in ("edm", "trigflow"):
            prediction_type = "sample"
        if net.config.num_classes and "null_cond" not in kwargs:
            kwargs["null_cond"] = {"class_labels": torch.tensor([net.config.num_classes])}
        super().__init__(schedule, prediction_type, **kwargs)
        self.net = net
        self.sigma_data = sigma_data

    def _net_inputs(self, x: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor | None]:
        """(x in the net's precision: float64 only for float64 nets, else float32; the class labels or None)."""
        return (x.double() if self.net_dtype == torch.float64 else x.float()), (cond or {}).get("class_labels")

    def network_output(self, x_t: Tensor, t: Tensor, cond: Cond | None, timestep_cond: Tensor | None) -> Tensor:
        x_t, labels = self._net_inputs(x_t, cond)
        if self.precondition == "none":
            return self.net(x_t, t.to(x_t.dtype) / self.schedule.num_train_timesteps, labels)
        alpha, sigma = self.schedule.coefficients(t, x_t)
        s = sigma / alpha
        sd2 = self.sigma_data**2
        x_ve = x_t / alpha
        if self.precondition == "trigflow":
            c_noise = torch.atan(s.reshape(-1) / self.sigma_data)
        else:
            c_noise = s.reshape(-1).clamp_min(1e-8).log() / 4
        F = self.net(x_ve / (s * s + sd2).sqrt(), c_noise, labels)
        return sd2 / (s * s + sd2) * x_ve + s * self.sigma_data / (s * s + sd2).sqrt() * F

    def trigflow_F(self, x_hat: Tensor, t_hat: Tensor, sigma_data: float, cond: Cond | None) -> Tensor | None:
        """With edm or trigflow preconditioning at the view's sigma_d, s = sigma_d tan t_hat and x_ve = x_hat / cos t_hat
        give c_in x_ve = x_hat / sigma_d and x0_hat = cos t_hat x_hat + sigma_d sin t_hat F_net, so TrigFlow's
        F = (cos t_hat x_hat - x0_hat) / (sigma_d sin t_hat) = -F_net(x_hat / sigma_d, c_noise): one network call,
        no native time (sCM's JVP skips the schedule's inverse: half its cost on the ring, benchmarks/scm_jvp_cost.py)."""
        if self.precondition == "none" or float(sigma_data) != float(self.sigma_data) or self.takes_guidance:
            return None
        self.check_cond(cond)
        x, labels = self._net_inputs(x_hat, cond)
        t_hat = t_hat.reshape(-1).to(torch.float64)
        c_noise = t_hat if self.precondition == "trigflow" else torch.log(self.sigma_data * torch.tan(t_hat)) / 4
        return -self.net(x / self.sigma_data, c_noise, labels)
