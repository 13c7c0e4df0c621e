"""Reflow on the reference ring: one-step SW2 and the straightness of each flow.

Reads a finished `fewstep distill gmm_reflow` run and prints, with 10k trajectories:
- S (Liu et al. 2022, eq. 6) of the analytic teacher on the flow schedule (the exact 1-rectified
  flow) and of the 2-rectified flow, and their ratio (target <= 0.5);
- SW2 to the reference mixture (50k samples, 256 directions, seed 0) of the teacher at 1/4/100 steps,
  the 2-rectified flow at 1/4 Euler steps and the distilled one-step student (target <= 0.13).

    python benchmarks/reflow_gmm.py runs/gmm_reflow
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser
from fewstep.eval import sliced_wasserstein2
from fewstep.eval.straightness import straightness
from fewstep.export import load_final
from fewstep.schedules import FlowSchedule
from fewstep.solvers import make_solver, sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="output_dir of a finished gmm_reflow run")
    ap.add_argument("--num", type=int, default=50_000)
    ap.add_argument("--trajectories", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = Path(args.run)
    mixture = make_mixture("ring")
    teacher = MixtureDenoiser(mixture, FlowSchedule())
    rf2, _, _ = load_final(run / "reflow" / "final")
    student, _, _ = load_final(run / "distill" / "final")
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.trajectories, 2, generator=g)
    s_teacher, _ = straightness(teacher, z)
    s_rf2, _ = straightness(rf2, z)
    print(f"straightness S over {args.trajectories} trajectories (200 Euler steps)")
    print(f"  1-rectified flow (analytic teacher): {s_teacher:.4f}")
    print(f"  2-rectified flow:                    {s_rf2:.4f}")
    print(f"  ratio:                               {s_rf2 / s_teacher:.3f}   (target <= 0.5)")
    reference = mixture.sample(args.num, torch.Generator().manual_seed(args.seed + 1))
    noise = torch.randn(args.num, 2, generator=torch.Generator().manual_seed(args.seed + 2))
    print(f"SW2 to the reference ring (N={args.num}); data floor "
          f"{sliced_wasserstein2(mixture.sample(args.num, torch.Generator().manual_seed(args.seed + 3)), reference):.4f}")
    rows = [("teacher, euler", teacher, "euler", n) for n in (1, 4, 100)]
    rows += [("2-rectified flow, euler", rf2, "euler", n) for n in (1, 4)]
    rows += [("distilled student, euler", student, "euler", 1)]
    for name, den, solver, n in rows:
        with torch.no_grad():
            x = sample(den, make_solver(solver), noise, den.schedule.sampling_grid(n))
        print(f"  {name:<26} {n:>3} steps: SW2 {sliced_wasserstein2(x, reference):.4f}")


if __name__ == "__main__":
    main()
