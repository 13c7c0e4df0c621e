"""Consistency distillation (Song et al. 2023; LCM, Luo et al. 2023), with its stochastic (SCott,
Liu et al. 2024) and adversarial (ACD; Kim et al. 2024, Sauer et al. 2023) variants as options.

One training step, per sample:
  n ~ U{0..N-1}, t = (n + 1) T/N - 1, s = max(t - T/N, 0)      (the skipping-step grid)
  x_t = alpha_t x0 + sigma_t eps                              (noised data)
  x_s = solver step t -> s of the teacher with CFG weight w    (no grad; w ~ U[w_min, w_max] per sample)
  target = f_target(x_s, s)                                   (EMA target network, or the online one, no grad)
  loss = d(f_theta(x_t, t), target)                           (L2 or elementwise pseudo-Huber)
with f the consistency parameterization (fewstep.consistency). w is in diffusers' convention
(a pipeline's guidance_scale); LCM's w is this w - 1.

Stochastic step (``eta`` > 0): the teacher step is DDIM with eta, its noise drawn per sample.
Adversarial term (``adversarial_weight`` > 0): a discriminator on x_t' = alpha x + sigma eps' of
real data (x = x0) and of the student's output (x = f_theta(x_t, t)); its updates are the loss's
"discriminator" phase, every ``discriminator_every``-th step.
"""
from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..consistency import SIGMA_DATA, TIMESTEP_SCALING, consistency_function
from ..ema import EMA
from ..errors import FewstepError, check_choice
from ..rng import SampleRNG
from ..solvers import SOLVERS, ddim_update, make_solver
from .base import DistillationLoss, LossOutput, Models
from .distances import DISTANCES
from .gan import GAN_LOSSES, critic_step, generator_loss

TARGETS = ("ema", "online")


class Draws(NamedTuple):
    """One step's random numbers: eps, the grid pair (t, s), the CFG weight w, the stochastic step's z, and the
    adversarial term's timestep and noise."""

    eps: Tensor
    t: Tensor
    s: Tensor
    w: Tensor | None
    z: Tensor | None
    adv_t: Tensor
    adv_eps: Tensor


class ConsistencyDistillationLoss(DistillationLoss):
    """LCM-style consistency distillation.

    Args:
        num_timesteps: N, the skipping-step grid size (LCM: 50 DDIM steps over T = 1000).
        solver: the teacher's one-step ODE solver (ddim, euler, heun, dpmpp_2m), or "data": no teacher,
            x_s = alpha_s x0 + sigma_s eps with x_t's own eps (consistency training, Song et al. 2023, sec. 5:
            the data point stands in for the teacher's x0 estimate; fine-tuning a student on new data).
        guidance_min, guidance_max: CFG weight range (diffusers convention); None: no guidance.
        target: "ema" (a separate target network, decay ``target_decay``) or "online" (the student
            without gradient; the LoRA setting).
        distance: "l2" or "pseudo_huber" (elementwise, constant ``huber_c``, as diffusers' scripts).
        eta: > 0 makes the teacher step a stochastic DDIM step (SCott-style); needs solver ddim.
        adversarial_weight, gan_loss, discriminator_every: the adversarial variant.
    """

    phases = ("student", "discriminator")  # every phase it can run; an instance runs ``phases_for`` its settings
    provided = ("student", "discriminator")
    choices = {"solver": (*(k for k in SOLVERS if k not in ("consistency", "renoise")), "data"), "target": TARGETS,
               "distance": tuple(DISTANCES), "gan_loss": GAN_LOSSES}

    def __init__(self, *, student=None, num_timesteps: int = 50, solver: str = "ddim",
                 guidance_min: float | None = None, guidance_max: float | None = None, target: str = "ema",
                 target_decay: float = 0.95, distance: str = "l2", huber_c: float = 0.001, eta: float = 0.0,
                 timestep_scaling: float = TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA,
                 adversarial_weight: float = 0.0, gan_loss: str = "hinge", discriminator_every: int = 2,
                 discriminator: nn.Module | None = None) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise FewstepError(f"num_timesteps must be at least 1, got {num_timesteps}")
        self.N = num_timesteps
        check_choice(solver, (*(k for k in SOLVERS if k not in ("consistency", "renoise")), "data"), "solver")
        self.from_data = solver == "data"
        self.solver = None if self.from_data else make_solver(solver)
        if (guidance_min is None) != (guidance_max is None):
            raise FewstepError("set both guidance_min and guidance_max (or neither)")
        if guidance_min is not None and guidance_min > guidance_max:
            raise FewstepError(f"guidance_min {guidance_min} exceeds guidance_max {guidance_max}")
        self.guidance = None if guidance_min is None else (float(guidance_min), float(guidance_max))
        self.target_kind = check_choice(target, TARGETS, "target")
        if not 0.0 <= target_decay < 1.0:
            raise FewstepError(f"target_decay must be in [0, 1), got {target_decay}")
        self.target_decay = target_decay
        self.distance = check_choice(distance, tuple(DISTANCES), "distance")
        self.huber_c = huber_c
        if eta < 0 or (eta > 0 and solver != "ddim"):
            raise FewstepError(f"eta must be >= 0, and eta > 0 needs solver ddim (got eta={eta}, solver={solver})")
        self.eta = eta
        self.timestep_scaling, self.sigma_data = timestep_scaling, sigma_data
        self.adversarial_weight = adversarial_weight
        self.gan_loss = check_choice(gan_loss, GAN_LOSSES, "gan_loss")
        if discriminator_every < 2:
            raise FewstepError(f"discriminator_every must be at least 2, got {discriminator_every}")
        self.discriminator_every = discriminator_every
        if adversarial_weight > 0:
            if discriminator is None:
                raise FewstepError("adversarial_weight > 0 needs a discriminator")
            self.discriminator = discriminator
        self.cycle = self.phase_cycle(adversarial_weight=adversarial_weight, discriminator_every=discriminator_every)
        self.phases = tuple(dict.fromkeys(self.cycle))
        self.target: nn.Module | None = None
        self._target_ema: EMA | None = None
        if self.target_kind == "ema":
            if student is None:
                raise FewstepError("target=ema needs the student to copy")
            self.target = copy.deepcopy(student).requires_grad_(False).eval()

    @classmethod
    def phase_cycle(cls, **settings: Any) -> tuple[str, ...]:
        """The adversarial variant: a discriminator step after every ``discriminator_every - 1`` student steps."""
        s = cls.settings(**settings)
        if s["adversarial_weight"] > 0:
            return ("student",) * (s["discriminator_every"] - 1) + ("discriminator",)
        return ("student",)

    @classmethod
    def from_models(cls, models: Models, **settings: Any) -> "ConsistencyDistillationLoss":
        s = cls.settings(**settings)
        if models.teacher is None and s["solver"] != "data":
            raise FewstepError("consistency distillation needs a teacher (teacher.kind is none); only solver: data "
                               "(consistency training on the data) runs without one")
        disc = None
        if s["adversarial_weight"] > 0:
            from ..discriminators import XTDiscriminator

            disc = XTDiscriminator.for_denoiser(models.student)
        return cls(student=models.student, discriminator=disc, **s)

    # ------------------------------------------------------------------ protocol
    def trains(self) -> dict[str, str]:
        return {"discriminator": "discriminator"} if self.adversarial_weight > 0 else {}

    def phase_modules(self, phase: str) -> tuple[str, ...]:
        return (phase,)

    def student_copies(self) -> dict[str, str]:
        return {"target": "target.net"} if self.target is not None else {}

    def sampler_settings(self) -> dict[str, Any]:
        """The boundary coefficients' settings, and N: ``spacing: lcm`` picks from the N-point grid trained on."""
        return {"timestep_scaling": self.timestep_scaling, "sigma_data": self.sigma_data, "original_steps": self.N}

    def f(self, den, x: Tensor, t: Tensor, cond, w: Tensor | None) -> Tensor:
        guidance = w if den.takes_guidance else None  # no CFG on students without a guidance input
        return consistency_function(den, x, t, cond, guidance=guidance, timestep_scaling=self.timestep_scaling,
                                    sigma_data=self.sigma_data)

    def timesteps(self, rng: SampleRNG, T: int) -> tuple[Tensor, Tensor]:
        k = T // self.N
        n = rng.randint(0, self.N).double()
        t = (n + 1) * k - 1
        return t, (t - k).clamp_min(0)

    def draws(self, rng: SampleRNG, shape: tuple[int, ...], T: int) -> Draws:
        """Every random number of a step, per sample, in a fixed order (both phases draw all of them)."""
        eps = rng.randn(*shape)
        t, s = self.timesteps(rng, T)
        w = rng.uniform(*self.guidance) if self.guidance is not None else None
        z = rng.randn(*shape) if self.eta > 0 else None
        adv_t = rng.randint(0, T).double()
        return Draws(eps, t, s, w, z, adv_t, rng.randn(*shape))

    def forward(self, phase, batch, student, teacher):
        x0 = batch["x0"].float()
        d = self.draws(SampleRNG(batch["seeds"], x0.device), tuple(x0.shape[1:]), student.schedule.num_train_timesteps)
        cond = student.batch_cond(batch)
        x_t = student.schedule.add_noise(x0, d.eps, d.t)
        if phase == "discriminator":
            with torch.no_grad():
                fake = self.f(student, x_t, d.t, cond, d.w)
            return self.discriminator_step(x0, fake, d.adv_t, d.adv_eps, student, cond)
        return self.student_step(x0, x_t, d, student, teacher, cond)

    def student_step(self, x0, x_t, d: Draws, student, teacher, cond) -> LossOutput:
        """d(f_theta(x_t, t), f_target(x_s, s)) with x_s the teacher's step t -> s (plus the adversarial term)."""
        t, s, w = d.t, d.s, d.w
        f_theta = self.f(student, x_t, t, cond, w)
        with torch.no_grad():
            guided = w if (cond is not None and teacher is not None and teacher.null_cond is not None) else None
            if self.from_data:
                x_s = student.schedule.add_noise(x0, d.eps, s)
            elif self.eta > 0:
                x0_hat, eps_hat = teacher.predict(x_t, t, cond, guidance=guided)
                x_s = ddim_update(teacher.schedule, x0_hat, eps_hat, t, s, eta=self.eta, z=d.z)
            else:
                x_s, _ = self.solver.step(teacher, x_t, t, s, cond, guidance=guided)
            target_net = self.target if self.target is not None else student
            target = self.f(target_net, x_s.float(), s, cond, w)
        per_sample = DISTANCES[self.distance](f_theta, target, self.huber_c)
        loss = per_sample.mean()
        logs = {"cd_loss": loss.detach()}
        if self.adversarial_weight > 0:
            x_adv = student.schedule.add_noise(f_theta, d.adv_eps, d.adv_t)
            g = generator_loss(self.discriminator(x_adv, d.adv_t, cond), self.gan_loss)
            loss = loss + self.adversarial_weight * g
            logs["gan_generator"] = g.detach()
        logs["loss"] = loss.detach()
        return LossOutput(loss, logs)

    def discriminator_step(self, x0, fake, adv_t, adv_eps, student, cond) -> LossOutput:
        """The discriminator on noised real data against the noised (detached) consistency output."""
        real_in = student.schedule.add_noise(x0, adv_eps, adv_t)
        fake_in = student.schedule.add_noise(fake, adv_eps, adv_t)
        loss, logs = critic_step(lambda x: self.discriminator(x, adv_t, cond), real_in, fake_in, self.gan_loss)
        return LossOutput(loss, {"loss": loss.detach(), **logs})

    # ------------------------------------------------------------------ target network
    def on_step_end(self, phase: str, student) -> None:
        if phase != "student" or self.target is None:
            return
        if self._target_ema is None:  # the target's own parameters are the average (fixed decay, as LCM)
            self._target_ema = EMA([], self.target_decay, averages=list(self.target.net.parameters()))
        self._target_ema.update(list(student.net.parameters()))

    def extra_state(self) -> dict[str, Tensor]:
        if self.target is None:
            return {}
        return {f"target.{n}": p.detach() for n, p in self.target.net.named_parameters()}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if self.target is None:
            return super().load_extra_state(state)
        params = dict(self.target.net.named_parameters())
        expected = {f"target.{n}" for n in params}
        if set(state) != expected:
            raise FewstepError("checkpoint's consistency target network does not fit this student")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[f"target.{n}"])
