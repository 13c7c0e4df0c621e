"""The two-step middle time of an sCM student on the reference ring, chosen on held-out seeds.

    python benchmarks/trigflow_middle.py runs/gmm_scm/scm/final [--seed 100] [--num 50000]

sCM's two-step sampler denoises at t = pi/2, re-noises to a middle TrigFlow time and denoises again (diffusers'
SCMScheduler ``intermediate_timesteps``: 1.3, SANA-Sprint's value; FastGen recommends sigma 0.821, t = 1.02, for
CIFAR-10 sCD). The best middle time depends on the data's scale, so this sweeps it with validation seeds (reference,
noise and re-noising draws all from ``--seed``, which must differ from benchmarks/gmm_students.py's seed 0) and
prints SW2 per value and the best one: set it as ``loss.intermediate_t``; gmm_students.py then reports on its own seeds.
"""
from __future__ import annotations

import argparse

import torch

from fewstep.data.mixtures import make_mixture
from fewstep.denoisers.trigflow import INTERMEDIATE_T_HAT
from fewstep.eval import sliced_wasserstein2
from fewstep.export import load_final
from fewstep.sampling import sampler_grid, sampler_solver
from fewstep.solvers import sample

#: middle times swept (TrigFlow t; the VP grid rounds each to an integer timestep)
MIDDLES = (0.8, 0.9, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--num", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=100, help="validation seeds (gmm_students.py reports with 0)")
    args = ap.parse_args()
    if args.seed == 0:
        ap.error("--seed 0 is benchmarks/gmm_students.py's: choose on other seeds")
    den, meta, _ = load_final(args.model)
    settings = meta["sampler"]
    if settings.get("spacing") != "trigflow":
        ap.error(f"{args.model} is not an sCM student (sampler spacing {settings.get('spacing')!r}, not 'trigflow')")
    mixture = make_mixture("ring")
    reference = mixture.sample(args.num, torch.Generator().manual_seed(args.seed + 1))
    noise = torch.randn(args.num, 2, generator=torch.Generator().manual_seed(args.seed + 2))
    scores = {}
    for middle in MIDDLES:
        s = {**settings, "intermediate_t": middle}
        grid = sampler_grid(den.schedule, s, 2)
        with torch.no_grad():
            x = sample(den, sampler_solver(s, seed=args.seed + 4), noise, grid)
        scores[middle] = float(sliced_wasserstein2(x, reference))
        print(f"  intermediate_t {middle:<5} (t = {int(grid[1])}): two-step SW2 {scores[middle]:.4f}", flush=True)
    best = min(scores, key=scores.get)
    trained = settings.get("intermediate_t") or INTERMEDIATE_T_HAT
    print(f"best intermediate_t {best} (SW2 {scores[best]:.4f}); the model's own {trained}")


if __name__ == "__main__":
    main()
