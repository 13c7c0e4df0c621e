"""SW2 of distilled students on the reference ring, next to the analytic teacher at the same step counts.

    python benchmarks/gmm_students.py runs/gmm_cd/cd/final [more final/ dirs] [--steps 1,4]

Each model is sampled with its own solver and spacing (fewstep.json) from the same noise; SW2 to
50k fresh reference samples (256 directions, seed 0), the foundation's definition.
"""
from __future__ import annotations

import argparse

import torch

from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser
from fewstep.eval import sliced_wasserstein2
from fewstep.export import load_final
from fewstep.schedules import VPSchedule
from fewstep.sampling import sampler_grid, sampler_solver
from fewstep.solvers import sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", default="1,4")
    ap.add_argument("--num", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    mixture = make_mixture("ring")
    reference = mixture.sample(args.num, torch.Generator().manual_seed(args.seed + 1))
    noise = torch.randn(args.num, 2, generator=torch.Generator().manual_seed(args.seed + 2))
    floor = sliced_wasserstein2(mixture.sample(args.num, torch.Generator().manual_seed(args.seed + 3)), reference)
    print(f"SW2 to the reference ring, N={args.num}; data floor {floor:.4f}")
    teacher = MixtureDenoiser(mixture, VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000, timestep_spacing="trailing"))
    rows = [("analytic teacher (ddim)", teacher, {"solver": "ddim", "steps": 1})]
    for path in args.models:
        den, meta, _ = load_final(path)
        rows.append((path, den, meta["sampler"]))
    for name, den, s in rows:
        cells = []
        solver = s["solver"]
        for n in steps:
            with torch.no_grad():  # every re-noising solver (consistency, renoise) from its own seeded generator
                x = sample(den, sampler_solver(s, seed=args.seed + 4), noise, sampler_grid(den.schedule, s, n))
            cells.append(f"{n} steps {sliced_wasserstein2(x, reference):.4f}")
        print(f"  {name:<40} {solver:<12} " + "  ".join(cells))


if __name__ == "__main__":
    main()
