"""What an sCM update costs on the ring, piece by piece, as ratios to the student's plain forward (same process).

    python benchmarks/scm_jvp_cost.py [--batch 512] [--steps 100]

The ring's student (gmm_teacher's MLP: hidden 128, depth 3, edm preconditioning, max_frequency 8) seen in TrigFlow,
at proposal times of gmm_scm: each row is timed interleaved with the plain forward F(x_t, t) (no grad), medians:
- forward and backward of F (what LCM's student pays per update);
- the JVP by forward-mode AD (fewstep.losses.scm.jvp) with the group_norm guard (a TorchFunctionMode that sees every
  torch call) and without it (what SCMLoss runs for a network without GroupNorm, fewstep.losses.scm.has_group_norm);
- the JVP through the native round trip (TrigFlowView.velocity: native time, the schedule's alpha and sigma, the
  denoiser's x0), which F skips for this MLP (MLPDenoiser.trigflow_F), and the two timed against each other;
- the same JVP by double backward (grad of a vector-Jacobian product; exact too, not used: it needs the graph);
- one whole SCMLoss update (teacher velocity, JVP, student forward, adaptive weight, backward) and one of gmm_cd's
  LCM loss (its DDIM teacher step, the EMA target's forward, the student's forward and backward, the target update);
and, timed against each other, the guard's saving (the two JVPs), sCM's cost over LCM (the two updates) and rCM's
(gmm_rcm: one cycle of two fake-score updates and one student update, sCM's and DMD's losses) over sCM's update.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser, MLPDenoiser
from fewstep.denoisers.mlp import MLPNet
from fewstep.denoisers.trigflow import TrigFlowView, trig_coefficients
from fewstep.eval.latency import interleaved
from fewstep.losses.base import Models
from fewstep.losses.consistency import ConsistencyDistillationLoss
from fewstep.losses.rcm import RCMLoss
from fewstep.losses.scm import SCMLoss, has_group_norm, jvp
from fewstep.rng import SampleRNG
from fewstep.schedules import VPSchedule, expand_as


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    schedule = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000, timestep_spacing="trailing")
    student = MLPDenoiser(MLPNet(dim=2, hidden=128, depth=3, max_frequency=8.0), schedule, precondition="edm")
    mixture = make_mixture("ring")
    teacher = MixtureDenoiser(mixture, schedule)
    models = Models(teacher=teacher, student=student, schedule=schedule)
    loss = SCMLoss.from_models(models)
    lcm = ConsistencyDistillationLoss.from_models(models, num_timesteps=50, solver="ddim", target="ema",
                                                  target_decay=0.95, distance="l2")  # gmm_cd's loss
    rcm = RCMLoss.from_models(models, dmd_weight=0.3, dmd={"fake_updates": 2, "fake_init": "student"})  # gmm_rcm's
    B = args.batch
    t, z, _ = loss.draws(SampleRNG(torch.arange(B) + B), (2,))  # the loss's own proposal times and noise
    cos, sin = trig_coefficients(t, z)
    x_t = cos * mixture.sample(B, torch.Generator().manual_seed(1)) + sin * z
    view = TrigFlowView(student, 0.5)
    F = lambda x, s: view.F(x, s)  # noqa: E731
    F_round_trip = lambda x, s: view.velocity(x, s) / 0.5  # noqa: E731
    scale = torch.cos(t) * torch.sin(t)
    tangents = (expand_as(scale.float(), x_t) * torch.randn(B, 2), scale)
    batch = {"x0": mixture.sample(B, torch.Generator().manual_seed(2)), "seeds": torch.arange(B)}

    def forward() -> None:
        with torch.no_grad():
            F(x_t, t)

    def forward_backward() -> None:
        student.zero_grad(set_to_none=True)
        F(x_t, t).square().mean().backward()

    def double_backward() -> None:
        x, s = x_t.detach().requires_grad_(True), t.detach().requires_grad_(True)
        out = F(x, s)
        u = torch.zeros_like(out, requires_grad=True)
        gx, gs = torch.autograd.grad(out, (x, s), u, create_graph=True)
        torch.autograd.grad((gx, gs), u, tangents)

    def update(objective) -> None:
        student.zero_grad(set_to_none=True)
        objective.zero_grad(set_to_none=True)
        objective("student", batch, student, teacher).loss.backward()
        objective.on_step_end("student", student)

    def rcm_cycle() -> None:
        for phase in rcm.cycle:
            student.zero_grad(set_to_none=True)
            rcm.zero_grad(set_to_none=True)
            rcm(phase, batch, student, teacher).loss.backward()
            rcm.on_step_end(phase, student)

    guarded = jvp(F, (x_t, t), tangents, contiguous_group_norm=True)[1]
    bare = jvp(F, (x_t, t), tangents, contiguous_group_norm=False)[1]
    print(f"ring MLP, batch {B}, {args.steps} interleaved calls per row; has_group_norm: {has_group_norm(student)}; "
          f"guarded vs unguarded tangent: max |diff| {float((guarded - bare).abs().max()):.2e} "
          f"(max |tangent| {float(guarded.abs().max()):.2e})")
    rows = [("forward and backward", forward_backward),
            ("JVP, group_norm guard on", lambda: jvp(F, (x_t, t), tangents, contiguous_group_norm=True)),
            ("JVP, guard off (SCMLoss here)", lambda: jvp(F, (x_t, t), tangents, contiguous_group_norm=False)),
            ("JVP, native round trip", lambda: jvp(F_round_trip, (x_t, t), tangents, contiguous_group_norm=False)),
            ("JVP by double backward", double_backward),
            ("whole sCM update", lambda: update(loss)),
            ("whole LCM update (gmm_cd's loss)", lambda: update(lcm))]
    print(f"{'piece':<32} {'ms':>8} {'forward ms':>11} {'x forward':>10}")
    for name, fn in rows:
        base, cost = interleaved(forward, fn, steps=args.steps)
        b, c = statistics.median(base) * 1e3, statistics.median(cost) * 1e3
        print(f"{name:<32} {c:>8.2f} {b:>11.2f} {c / b:>10.2f}")
    on, off = interleaved(rows[1][1], rows[2][1], steps=3 * args.steps)
    print(f"JVP guard off / on, interleaved directly: {statistics.median(off) / statistics.median(on):.3f}")
    direct, round_trip = interleaved(rows[2][1], rows[3][1], steps=3 * args.steps)
    print(f"JVP direct / native round trip, interleaved directly: {statistics.median(direct) / statistics.median(round_trip):.3f}")
    scm, cd = interleaved(lambda: update(loss), lambda: update(lcm), steps=3 * args.steps)
    print(f"sCM / LCM update (loss, backward, target EMA; no optimizer step), interleaved directly: "
          f"{statistics.median(scm) / statistics.median(cd):.3f}")
    cycle, scm = interleaved(rcm_cycle, lambda: update(loss), steps=args.steps)
    print(f"rCM cycle (2 fake-score updates + 1 student update) / sCM update, interleaved directly: "
          f"{statistics.median(cycle) / statistics.median(scm):.3f}")


if __name__ == "__main__":
    main()
