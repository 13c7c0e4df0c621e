"""Score-regularized continuous-time consistency distillation (rCM; Zheng et al. 2025, "Large Scale Diffusion
Distillation via Score-Regularized Continuous-Time Consistency", arXiv 2510.08431; NVlabs/rcm,
rcm/models/t2v_model_distill_rcm.py).

sCM's objective (fewstep.losses.scm, the forward-divergence, mode-covering part) plus ``dmd_weight`` times DMD's
distribution-matching loss on the student's own one-step samples (fewstep.losses.fdivergence with reverse KL, the
mode-seeking part), both in one student update; a fake score trained on the student's samples between student
updates. The two losses are the existing loss objects, composed: this file holds no formula of its own.

Phases, cycled as f-distill's: [fake_score] * fake_updates + [generator]
  fake_score: the fake score's denoising loss on detached student samples (FDivergenceLoss.fake_score_step)
  generator:  L_sCM(theta, phi) + dmd_weight * L_DMD(theta)  (theta: the student, phi: sCM's adaptive weight)

NVlabs/rcm runs one student update per ``student_update_freq`` = 5 iterations (4 fake-score updates; 10 for its
14B model) and sums per-sample losses over elements with ``loss_scale`` 100 on sCM and ``loss_scale_dmd`` 1 on
DMD, without sCM's adaptive weighting; fewstep keeps sCM's weighting (its loss is about 1 per sample at the
weighting's optimum) and takes the DMD weight as a setting, measured on the ring (docs/consistency.md).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import FewstepError
from ..rng import sample_seed
from .base import DistillationLoss, LossOutput, Models
from .fdivergence import FDivergenceLoss
from .scm import SCMLoss

#: the seed stream the DMD term draws from (its own, so its noise is independent of sCM's)
DMD_STREAM = 1


def _check_weight(dmd_weight: float) -> None:
    if not dmd_weight > 0:
        raise FewstepError(f"loss.dmd_weight must be > 0 (got {dmd_weight}); for sCM alone use loss.name: scm")


class RCMLoss(DistillationLoss):
    """sCM with DMD's score regularizer (rCM).

    Args:
        dmd_weight: lambda of L_sCM + lambda L_DMD (> 0; 0 would be sCM with an idle fake score: use loss scm).
            1.0 is NVlabs/rcm's ``loss_scale_dmd``, whose scale (against its sCM ``loss_scale`` 100, both summed over
            elements, no adaptive weight) does not carry over; the ring prefers 0.3 (docs/consistency.md).
        scm: SCMLoss's settings (``loss.scm.p_std``, ...), defaults as loss scm.
        dmd: FDivergenceLoss's settings (``loss.dmd.fake_updates``, ``fake_init``, ...), defaults as loss fdistill;
            the divergence is reverse_kl (DMD) unless set. Its ``steps`` > 1 backward-simulates on f-distill's
            trailing grid (or ``dmd.timesteps``), not on sCM's TrigFlow grid.
    """

    phases = FDivergenceLoss.phases
    student_phase = FDivergenceLoss.student_phase
    groups = (*SCMLoss.groups, *FDivergenceLoss.groups)
    provided = ("scm_loss", "dmd_loss")

    def __init__(self, *, dmd_weight: float = 1.0, scm: dict[str, Any] | None = None,
                 dmd: dict[str, Any] | None = None, scm_loss: SCMLoss | None = None,
                 dmd_loss: FDivergenceLoss | None = None) -> None:
        super().__init__()
        _check_weight(dmd_weight)
        if scm_loss is None or dmd_loss is None:
            raise FewstepError("rCM is built from the models (RCMLoss.from_models): it needs an sCM and a DMD loss")
        self.dmd_weight = float(dmd_weight)
        self.scm, self.dmd = scm_loss, dmd_loss
        self.needs = {"x0": " for its sCM term (x_t = cos t x0 + sin t z)"}
        self.cycle = dmd_loss.cycle

    # ------------------------------------------------------------------ construction
    @classmethod
    def _parts(cls, **settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        s = cls.settings(**settings)
        dmd = {"divergence": "reverse_kl", **FDivergenceLoss.checked_settings(s["dmd"] or {}, "loss.dmd", "loss.dmd.")}
        return SCMLoss.checked_settings(s["scm"] or {}, "loss.scm", "loss.scm."), dmd

    @classmethod
    def check(cls, **settings: Any) -> None:
        _check_weight(cls.settings(**settings)["dmd_weight"])
        scm, dmd = cls._parts(**settings)
        SCMLoss.check(**scm)
        FDivergenceLoss.check(**dmd)

    @classmethod
    def phase_cycle(cls, **settings: Any) -> tuple[str, ...]:
        return FDivergenceLoss.phase_cycle(**cls._parts(**settings)[1])

    @classmethod
    def from_models(cls, models: Models, **settings: Any) -> "RCMLoss":
        scm, dmd = cls._parts(**settings)
        s = cls.settings(**settings)
        return cls(dmd_weight=s["dmd_weight"], scm=scm, dmd=dmd, scm_loss=SCMLoss.from_models(models, **scm),
                   dmd_loss=FDivergenceLoss.from_models(models, **dmd))

    # ------------------------------------------------------------------ protocol
    def trains(self) -> dict[str, str]:
        return {**{n: f"scm.{p}" for n, p in self.scm.trains().items()},
                **{n: f"dmd.{p}" for n, p in self.dmd.trains().items()}}

    def phase_modules(self, phase: str) -> tuple[str, ...]:
        if phase == self.student_phase:
            return self.scm.phase_modules(self.scm.student_phase)
        return self.dmd.phase_modules(phase)

    def lora_alternatives(self) -> dict[str, tuple[int, list[str], str]]:
        return {n: (rank, targets, f"dmd.{how}") for n, (rank, targets, how) in self.dmd.lora_alternatives().items()}

    def sampler_settings(self) -> dict[str, Any]:
        """sCM's TrigFlow grid (the student samples as an sCM student)."""
        return self.scm.sampler_settings()

    # ------------------------------------------------------------------ a step
    def forward(self, phase, batch, student, teacher):
        own = {**batch, "seeds": torch.as_tensor([sample_seed(int(s), DMD_STREAM) for s in batch["seeds"]])}
        if phase == "fake_score":
            return self.dmd(phase, own, student, teacher)
        if phase != self.student_phase:
            raise FewstepError(f"unknown phase {phase!r}; valid: {', '.join(self.phases)}")
        with self.dmd.teacher_as_itself(teacher):  # a teacher_lora fake score's adapters sit on the teacher's network
            out_c = self.scm(self.scm.student_phase, batch, student, teacher)
        out_d = self.dmd(self.dmd.student_phase, own, student, teacher)
        loss = out_c.loss + self.dmd_weight * out_d.loss
        logs = {f"scm_{k}": v for k, v in out_c.logs.items()} | {f"dmd_{k}": v for k, v in out_d.logs.items()}
        return LossOutput(loss, {**logs, "loss": loss.detach()})

    def on_step_end(self, phase: str, student) -> None:
        if phase == self.student_phase:
            self.scm.on_step_end(self.scm.student_phase, student)  # the tangent warm-up counts student updates
        self.dmd.on_step_end(phase, student)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Tensor]:
        return {**{f"scm.{k}": v for k, v in self.scm.extra_state().items()},
                **{f"dmd.{k}": v for k, v in self.dmd.extra_state().items()}}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        unknown = [k for k in state if not k.startswith(("scm.", "dmd."))]
        if unknown:
            raise FewstepError(f"checkpoint's rCM state has keys {sorted(state)}; expected scm.* and dmd.* keys")
        self.scm.load_extra_state({k[4:]: v for k, v in state.items() if k.startswith("scm.")})
        self.dmd.load_extra_state({k[4:]: v for k, v in state.items() if k.startswith("dmd.")})
