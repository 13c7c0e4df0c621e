"""f-divergence distribution matching (f-distill, Xu et al. 2025); DMD / DMD2 (Yin et al. 2024) is its
reverse-KL member.

Two phases, cycled as [fake_score] * fake_updates + [generator] (the two time-scale update rule of DMD2):

- fake_score: ordinary denoising loss of the fake score on detached generator samples, plus, when there is a
  discriminator, its non-saturating GAN loss softplus(-D(real_t)) + softplus(D(fake_t)) on the same samples,
  both stepped by one optimizer (the discriminator in its own parameter group: ``optimizers.discriminator``).
  DMD2 updates its fake UNet and classifier head together on every guidance iteration (tianweiy/DMD2,
  main/train_sd.py), so the discriminator gets ``fake_updates`` updates per generator update.
- generator: the distribution-matching loss, plus ``gan_weight`` softplus(-D(fake_t)).

Distribution-matching gradient for a generator sample x, t ~ U[t_min, t_max] T, x_t = alpha x + sigma eps:
    grad = (x0_fake - x0_real) * w,   w = h(r) / mean_batch(h(r)) / mean|x - x0_real|   (per sample)
    loss_dm = 0.5 * mean((x - stopgrad(x - grad))^2)
Reduction: the mean over batch and elements (DMD2, FastGen), so d loss_dm / dx = grad / numel(x);
a sum would give exactly grad. r = p_data / q_theta from the discriminator: r = exp(clamp(logit, -10, 10))
clipped to [0.1, 20], optionally divided by a running mean per timestep bin. With h = 1 (reverse-KL)
this is DMD's loss (tested).

The generator's timesteps: the trailing grid of ``steps`` (999 for one step; 999, 749, 499, 249 for four), or
``timesteps`` as given. DMD2 SDXL conditions its one-step generator at 399 (``--conditioning_timestep 399``):
the UNet sees pure noise z with timestep 399, and x0 = (z - sqrt(1 - abar_399) eps_hat) / sqrt(abar_399).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FewstepError, check_choice, lookup
from ..lora import WIDE_TARGETS, adapters_off
from ..rng import SampleRNG
from ..schedules import expand_as
from .base import DistillationLoss, LossOutput, Models
from .gan import critic_step, generator_loss

#: fake-score initializations for network teachers (True) and weightless ones (False)
FAKE_INITS = {True: ("teacher", "teacher_lora"), False: ("scratch", "student")}
#: what the fake score's denoising loss compares: its native output with the native target, or x0_hat with the sample
FAKE_TARGETS = ("native", "x0")
#: default LoRA targets of a ``teacher_lora`` fake score (diffusers UNet and transformer layer names)
FAKE_LORA_TARGETS = WIDE_TARGETS

#: h(r) = r^2 f''(r) for each divergence (f-distill, Table 1)
WEIGHTINGS = {
    "reverse_kl": lambda r: torch.ones_like(r),
    "forward_kl": lambda r: r,
    "jensen_shannon": lambda r: r / (1 + r),
    "squared_hellinger": lambda r: r.sqrt(),
    "neyman_chi2": lambda r: 1 / r,
    "jeffreys": lambda r: 1 + r,
    "softened": lambda r: 1 / (1 + r),
}


def density_ratio(logits: Tensor, clip: tuple[float, float] = (0.1, 20.0)) -> Tensor:
    """r = exp(clamp(logit, -10, 10)) clipped to ``clip`` (the discriminator's estimate of p_data / q)."""
    return logits.float().clamp(-10, 10).exp().clamp(*clip)


def dm_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(loss, grad): DMD's distribution-matching loss with per-sample weights h (normalized by their mean)."""
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        w = 1.0 / (x.float() - x0_real).abs().mean(dims, keepdim=True).clamp_min(1e-8)
        if h is not None:
            w = w * expand_as(h / h.mean(), x)
        grad = (x0_fake - x0_real) * w
        target = x.float() - grad
    return 0.5 * F.mse_loss(x.float(), target), grad


def load_fake_score(net: nn.Module, checkpoint: str) -> None:
    """Load a checkpoint's ``module.fake_score.safetensors`` (its trainable weights and buffers) into ``net``."""
    from pathlib import Path

    from safetensors.torch import load_file

    file = Path(checkpoint) / "module.fake_score.safetensors"
    if not file.is_file():
        raise FewstepError(f"loss.fake_from: {file} not found (a checkpoint of an f-distill run holds it)")
    state = load_file(str(file))
    own = dict(net.named_parameters()) | dict(net.named_buffers())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise FewstepError(f"loss.fake_from: {file} is not a fake score of this network (e.g. {unknown[0]!r})")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise FewstepError(f"loss.fake_from: {k} has shape {tuple(v.shape)} in {file}, "
                                   f"{tuple(own[k].shape)} here")
            own[k].copy_(v)


class FDivergenceLoss(DistillationLoss):
    """f-distill / DMD2 for one-step (or k-step, backward-simulated) generators.

    Args:
        divergence: reverse_kl (DMD), forward_kl, jensen_shannon, squared_hellinger, neyman_chi2, jeffreys, softened.
        guidance: the teacher's CFG weight for the real score (diffusers' convention; SD 1.5 ~1.75).
        fake_updates: fake-score (and discriminator) updates per generator update (TTUR; DMD2: 10 for SD 1.5, 5 SDXL).
        gan_weight: weight of the generator's GAN term (f-distill needs > 0 unless reverse_kl; DMD2 SD1.5 ~1e-3).
        t_min, t_max: fractions of T for the distribution-matching timesteps (0.02, 0.98).
        fake_t_min, fake_t_max: fractions of T for the fake score's denoising loss (and the discriminator, which
            trains on the same samples); None: t_min, t_max (FastGen). DMD2 draws them from all of [0, T)
            (``main/sd_guidance.py`` ``compute_loss_fake``: randint(0, num_train_timesteps)): 0.0 and 0.999.
        steps: k generator steps (1: one step at t = T - 1; 4: DMD2's 999, 749, 499, 249, trained by
            backward simulation: inputs come from the student's own sampler).
        timesteps: the k generator timesteps instead of the trailing grid (DMD2 SDXL one step: [399], its
            ``conditioning_timestep``); the first step always starts from pure noise. Exported with the model.
        ratio_bins: > 0 divides r by its running mean in that many timestep bins (momentum ``ratio_momentum``).
        regression_weight: weight of an L2 regression of G(noise) onto teacher pairs (data name pairs), a warm-up.
        fake_init: network teachers: "teacher" (a full trainable copy, DMD2) or "teacher_lora" (LoRA adapters on
            the frozen teacher, which runs with them disabled: one copy of the weights); weightless teachers:
            "scratch" or a copy of the "student" (which starts as a trained denoiser).
        fake_lora_rank, fake_lora_targets: the adapters of ``teacher_lora`` (targets absent from the network are
            skipped).
        fake_target: the fake score's denoising loss on its ``native`` output (the network's own parameterization)
            or on ``x0`` (x0_hat against the generator sample; FastGen's ``fake_score_pred_type = "x0"``, its FLUX.1
            DMD2). On a flow the x0 loss is the velocity loss times s^2.
        fake_from: ``stage:NAME`` (that stage's newest checkpoint) or a checkpoint directory: its fake score's
            weights replace the fresh ``fake_init`` copy, so a stage that continues an f-distill run keeps the
            fake score it trained (DMD2's GAN stage resumes generator and fake UNet from the matching run).
    """

    phases = ("fake_score", "generator")
    student_phase = "generator"
    #: a module with its own optimizer settings (``optimizers.discriminator``), a parameter group of fake_score
    groups = ("discriminator",)
    choices = {"divergence": tuple(WEIGHTINGS), "fake_init": (*FAKE_INITS[True], *FAKE_INITS[False]),
               "fake_target": FAKE_TARGETS}
    provided = ("fake_score", "discriminator", "sample_shape", "fake_shares_teacher")

    def __init__(self, *, fake_score: Any = None, discriminator: nn.Module | None = None, divergence: str = "reverse_kl",
                 guidance: float | None = None, fake_updates: int = 5,
                 gan_weight: float = 0.0, t_min: float = 0.02, t_max: float = 0.98,
                 fake_t_min: float | None = None, fake_t_max: float | None = None, steps: int = 1,
                 timesteps: list[int] | None = None, ratio_bins: int = 0, ratio_momentum: float = 0.99, regression_weight: float = 0.0,
                 sample_shape: tuple[int, ...] | None = None, fake_init: str | None = None, fake_lora_rank: int = 64,
                 fake_lora_targets: list[str] | None = None, fake_from: str | None = None,
                 fake_shares_teacher: bool = False, fake_target: str = "native") -> None:
        super().__init__()
        self.fake_target = check_choice(fake_target, FAKE_TARGETS, "fake_target")
        self.fake_init, self.fake_lora_rank = fake_init, fake_lora_rank
        self.fake_lora_targets = fake_lora_targets or FAKE_LORA_TARGETS
        #: the fake score is the teacher's network with its LoRA adapters on (``fake_init: teacher_lora``)
        self.fake_shares_teacher = fake_shares_teacher
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.divergence = divergence
        self.h = lookup(WEIGHTINGS, divergence, "divergence")
        if fake_score is None:
            raise FewstepError("f-divergence distillation needs a fake score network")
        self.fake_score = fake_score
        self.guidance = guidance
        if fake_updates < 1 or steps < 1:
            raise FewstepError("fake_updates and steps must be >= 1")
        if timesteps is not None and len(timesteps) != steps:
            raise FewstepError(f"loss.timesteps has {len(timesteps)} values but loss.steps is {steps}; give one "
                               "timestep per generator step")
        self.timesteps = None if timesteps is None else [int(t) for t in timesteps]
        fake_t_min = t_min if fake_t_min is None else fake_t_min
        fake_t_max = t_max if fake_t_max is None else fake_t_max
        for lo, hi, names in ((t_min, t_max, "t_min < t_max"), (fake_t_min, fake_t_max, "fake_t_min < fake_t_max")):
            if not 0.0 <= lo < hi <= 1.0:
                raise FewstepError(f"need 0 <= {names} <= 1, got {lo}, {hi}")
        self.fake_t_min, self.fake_t_max = fake_t_min, fake_t_max
        if gan_weight < 0 or regression_weight < 0:
            raise FewstepError("gan_weight and regression_weight must be >= 0")
        self.uses_ratio = divergence != "reverse_kl"
        needs_discriminator = self.has_discriminator(divergence=divergence, gan_weight=gan_weight)
        if needs_discriminator and discriminator is None:
            raise FewstepError(f"divergence {divergence} (or gan_weight > 0) needs a discriminator")
        if self.uses_ratio and gan_weight == 0:
            raise FewstepError(f"divergence {divergence} needs gan_weight > 0 (f-distill: the GAN term keeps the "
                               "ratio estimate meaningful); only reverse_kl may run without it")
        self.discriminator = discriminator if needs_discriminator else None
        self.fake_updates = fake_updates
        self.gan_weight, self.t_min, self.t_max, self.steps = gan_weight, t_min, t_max, steps
        self.regression_weight = regression_weight
        if needs_discriminator:
            self.needs = {"x0": f" for its discriminator (divergence {divergence}, gan_weight {gan_weight}; only "
                                "reverse_kl with gan_weight 0 runs on prompts alone)"}
        else:
            self.needs = {"x0": " for its regression term"} if regression_weight > 0 else {"cond": ""}
        self.cycle = self.phase_cycle(fake_updates=fake_updates)
        self.ratio_bins, self.ratio_momentum = ratio_bins, ratio_momentum
        self.register_buffer("ratio_mean", torch.ones(max(ratio_bins, 1)))

    @classmethod
    def has_discriminator(cls, **settings: Any) -> bool:
        s = cls.settings(**settings)
        return s["divergence"] != "reverse_kl" or s["gan_weight"] > 0

    @classmethod
    def grads_through_teacher(cls, **settings: Any) -> bool:
        """The generator's GAN term and r(x) reach x through the teacher's features (FeatureDiscriminator); a
        ``teacher_lora`` fake score's loss reaches its adapters through the frozen teacher."""
        return cls.has_discriminator(**settings) or cls.settings(**settings)["fake_init"] == "teacher_lora"

    @classmethod
    def phase_cycle(cls, **settings: Any) -> tuple[str, ...]:
        """[fake_score] * fake_updates + [generator]: DMD2's two time-scale update rule."""
        return ("fake_score",) * cls.settings(**settings)["fake_updates"] + ("generator",)

    @classmethod
    def from_models(cls, models: Models, **settings: Any) -> "FDivergenceLoss":
        """The fake score: a full copy of the teacher's network (a small MLP from scratch for weightless
        teachers); the discriminator: a head on the teacher's features, or on (x_t, t) for toy teachers."""
        from ..discriminators import FeatureDiscriminator, TokenFeatureDiscriminator, XTDiscriminator, transformer_blocks

        teacher, student = models.teacher, models.student
        if teacher is None:
            raise FewstepError("f-divergence distillation needs a teacher (teacher.kind is none)")
        s = cls.settings(**settings)
        T = student.schedule.num_train_timesteps
        bad = [t for t in s["timesteps"] or [] if not 0 <= int(t) < T]
        if bad:
            raise FewstepError(f"loss.timesteps {bad} outside the schedule's 0..{T - 1}")
        has_net = hasattr(teacher, "net")
        init = check_choice(s["fake_init"] or ("teacher" if has_net else "scratch"),
                            FAKE_INITS[has_net], "fake_init" + ("" if has_net else " (weightless teacher)"))
        s["fake_init"] = init
        if init == "teacher_lora":
            from ..lora import default_targets, inject_lora

            net = teacher.net
            targets = default_targets(net, s["fake_lora_targets"] or FAKE_LORA_TARGETS)
            inject_lora(net, rank=s["fake_lora_rank"], alpha=None, target_modules=targets, adapter_name="fake_score")
            for n, p in net.named_parameters():  # adapters train in float32 on a half-precision teacher
                if "lora_" in n:
                    p.data = p.data.float()
            fake = teacher.with_network(net)  # the same network (adapters on it), the teacher's own wrapper
        elif init == "teacher":
            fake = copy.deepcopy(teacher).float().requires_grad_(True)
            fake.net.requires_grad_(True)
        else:  # the analytic mixture: a network shaped like the student, fresh or a copy of the student
            fake = copy.deepcopy(student)
            if init == "scratch":
                for m in fake.net.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            fake.requires_grad_(True)
        if s["fake_from"]:
            load_fake_score(fake.net, s["fake_from"])
        disc = None
        if cls.has_discriminator(**s):
            if hasattr(teacher, "net") and hasattr(teacher.net, "mid_block"):
                disc = FeatureDiscriminator(teacher)
            elif hasattr(teacher, "net") and transformer_blocks(teacher.net):  # SD3, FLUX.1
                disc = TokenFeatureDiscriminator(teacher)
            else:
                disc = XTDiscriminator.for_denoiser(student)
        return cls(fake_score=fake, discriminator=disc, sample_shape=models.sample_shape,
                   fake_shares_teacher=init == "teacher_lora", **s)

    # ------------------------------------------------------------------ protocol
    def trains(self) -> dict[str, str]:
        return {"fake_score": "fake_score.net", **({"discriminator": "discriminator"} if self.discriminator is not None else {})}

    def phase_modules(self, phase: str) -> tuple[str, ...]:
        critic = ("fake_score", "discriminator") if self.discriminator is not None else ("fake_score",)
        return {"fake_score": critic, "generator": ("student",)}[phase]

    def lora_alternatives(self) -> dict[str, tuple[int, list[str], str]]:
        if self.fake_init != "teacher":
            return {}
        return {"fake_score": (self.fake_lora_rank, list(self.fake_lora_targets), "fake_init: teacher_lora")}

    # ------------------------------------------------------------------ pieces
    def _t_dm(self, rng: SampleRNG, T: int, phase: str = "generator") -> Tensor:
        """t ~ U{t_min T .. t_max T} (the fake score's phase: fake_t_min, fake_t_max)."""
        lo, hi = (self.t_min, self.t_max) if phase == "generator" else (self.fake_t_min, self.fake_t_max)
        return rng.randint(int(lo * T), int(hi * T) + 1).double()

    def generate(self, student, z: Tensor, cond, rng: SampleRNG, grad: bool) -> Tensor:
        """x = G(z): one step at the top timestep, or k steps with re-noising (backward simulation: the
        first j steps without grad, j ~ U{0..k-1} per sample, then one step with grad)."""
        sch = student.schedule
        if self.timesteps is not None:
            ts = torch.tensor(self.timesteps, dtype=torch.float64, device=z.device)
        else:  # indexed below by j, which lives on the student's device
            ts = sch.sampling_grid(self.steps, "trailing" if sch.kind == "vp" else None)[:-1].to(z.device)
        B = z.shape[0]
        if self.steps == 1:
            with torch.set_grad_enabled(grad):
                return student(z, ts[0].expand(B), cond)
        j = rng.randint(0, self.steps)
        renoise = [rng.randn(*z.shape[1:]) for _ in range(self.steps - 1)]
        x, inputs = z, [z]
        with torch.no_grad():
            for i in range(self.steps - 1):
                x0 = student(x, ts[i].expand(B), cond)
                x = sch.add_noise(x0, renoise[i], ts[i + 1].expand(B))
                inputs.append(x)
        stacked = torch.stack(inputs)  # (k, B, ...)
        x_j = stacked[j, torch.arange(B)]
        with torch.set_grad_enabled(grad):
            return student(x_j, ts[j], cond)

    def teacher_as_itself(self, teacher):
        """The teacher without the fake score's adapters (``teacher_lora``: they sit on its network)."""
        return adapters_off(teacher.net) if self.fake_shares_teacher else contextlib.nullcontext()

    def _disc(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        with self.teacher_as_itself(self.fake_score):
            return self.discriminator(x_t, t, cond)

    def _ratio(self, logits: Tensor, t: Tensor, T: int) -> Tensor:
        r = density_ratio(logits)
        if self.ratio_bins > 0:
            bins = (t.float() / T * self.ratio_bins).long().clamp(0, self.ratio_bins - 1).to(r.device)
            if self.training:
                with torch.no_grad():
                    for b in bins.unique():
                        m = r[bins == b].mean()
                        self.ratio_mean[b] = self.ratio_momentum * self.ratio_mean[b] + (1 - self.ratio_momentum) * m
            r = r / self.ratio_mean[bins]
        return r

    def forward(self, phase, batch, student, teacher):
        ref = batch["x0"] if "x0" in batch else None
        rng = SampleRNG(batch["seeds"], next(student.net.parameters()).device)
        shape = self.sample_shape if ref is None else tuple(ref.shape[1:])
        z = batch["noise"].float() if "noise" in batch else rng.randn(*shape)
        eps = rng.randn(*shape)
        t = self._t_dm(rng, student.schedule.num_train_timesteps, phase)
        step = lookup({"fake_score": self.fake_score_step, "generator": self.generator_step}, phase, "phase")
        return step(batch, student, teacher, rng=rng, z=z, eps=eps, t=t, cond=student.batch_cond(batch))

    def fake_score_step(self, batch, student, teacher, *, rng, z, eps, t, cond) -> LossOutput:
        """The fake score's denoising loss on detached generator samples (and the discriminator's GAN loss)."""
        x = self.generate(student, z, cond, rng, grad=False).detach()
        x_t = student.schedule.add_noise(x, eps, t)
        if self.fake_target == "x0":  # FastGen's fake_score_pred_type "x0": the denoising loss on x0_hat
            loss = F.mse_loss(self.fake_score(x_t, t, cond), x.float())
        else:
            loss = F.mse_loss(self.fake_score.native(x_t, t, cond), self.fake_score.native_target(x, eps, t))
        logs = {"fake_score_loss": loss.detach()}
        if self.discriminator is not None:  # DMD2: the classifier trains with the fake score, same samples
            real_t = student.schedule.add_noise(batch["x0"].float(), eps, t)
            d_loss, d_logs = critic_step(lambda x: self._disc(x, t, cond), real_t, x_t, "non_saturating")
            loss = loss + d_loss
            logs.update(d_logs)
        return LossOutput(loss, {"loss": loss.detach(), **logs})

    def generator_step(self, batch, student, teacher, *, rng, z, eps, t, cond) -> LossOutput:
        """The distribution-matching loss weighted by h(r), plus the GAN and regression terms."""
        x = self.generate(student, z, cond, rng, grad=True)
        x_t = student.schedule.add_noise(x, eps, t)
        logs: dict[str, Any] = {}
        with torch.no_grad():
            guided = self.guidance if (cond is not None and teacher.null_cond is not None) else None
            with self.teacher_as_itself(teacher):
                x0_real = teacher(x_t, t, cond, guidance=guided)
            x0_fake = self.fake_score(x_t, t, cond)
            h = None
            if self.uses_ratio:
                r = self._ratio(self._disc(x_t, t, cond), t, student.schedule.num_train_timesteps)
                h = self.h(r)
                logs.update(r_mean=r.mean(), r_max=r.max(), h_mean=h.mean(), h_max=h.max())
        loss, grad = dm_loss(x, x0_real, x0_fake, h)
        logs["dm_loss"] = loss.detach()
        logs["dm_grad_norm"] = grad.flatten(1).norm(dim=1).mean()
        if self.gan_weight > 0:
            g = generator_loss(self._disc(x_t, t, cond), "non_saturating")
            loss = loss + self.gan_weight * g
            logs["gan_generator"] = g.detach()
        if self.regression_weight > 0:
            if "noise" not in batch:
                raise FewstepError("regression_weight > 0 needs teacher pairs (data.name: pairs)")
            reg = F.mse_loss(x.float(), batch["x0"].float().to(z.device))
            loss = loss + self.regression_weight * reg
            logs["regression"] = reg.detach()
        logs["loss"] = loss.detach()
        return LossOutput(loss, logs)

    def sampler_settings(self) -> dict[str, Any]:
        return {} if self.timesteps is None else {"timesteps": list(self.timesteps)}

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Tensor]:
        return {"ratio_mean": self.ratio_mean.detach().clone()} if self.ratio_bins > 0 else {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if self.ratio_bins > 0:
            if "ratio_mean" not in state:
                raise FewstepError("checkpoint has no ratio bins but loss.ratio_bins > 0")
            self.ratio_mean.copy_(state["ratio_mean"])
        elif state:
            super().load_extra_state(state)
