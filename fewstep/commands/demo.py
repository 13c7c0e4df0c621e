"""`fewstep demo`: the embedded default job, offline on a CPU.

Until the distillation loop lands, the demo samples the analytic teacher of the reference mixture
(8 Gaussians on a ring) on Stable Diffusion 1.5's schedule at several step counts and prints each
one's sliced Wasserstein-2 distance to fresh samples of the true mixture, and its time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..data.mixtures import make_mixture
from ..denoisers import MixtureDenoiser
from ..errors import FewstepError
from ..eval import sliced_wasserstein2
from ..schedules import VPSchedule
from ..solvers import make_solver, sample


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default: the analytic mixture teacher at several step counts")
    p.add_argument("--steps", default="1,2,4,8,25,50", help="comma-separated step counts (default 1,2,4,8,25,50)")
    p.add_argument("--solver", default="ddim", help="ddim, euler, heun or dpmpp_2m (default ddim)")
    p.add_argument("--mixture", default="ring", help="ring or imbalanced_ring (default ring)")
    p.add_argument("--num", type=int, default=50_000, help="samples per evaluation (default 50000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="optional JSON file for the results")
    p.add_argument("--quick", action="store_true", help="10,000 samples and steps 1,4,25")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    num = 10_000 if args.quick else args.num
    steps_arg = "1,4,25" if args.quick else args.steps
    try:
        steps = [int(s) for s in steps_arg.split(",")]
    except ValueError:
        raise FewstepError(f"--steps must be comma-separated integers, got {steps_arg!r}") from None
    if num < 2 or any(s < 1 for s in steps):
        raise FewstepError("--num must be >= 2 and every step count >= 1")
    if args.out and Path(args.out).exists():
        raise FewstepError(f"{args.out} exists; choose another --out (nothing is overwritten)")
    mixture = make_mixture(args.mixture)
    schedule = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)
    teacher = MixtureDenoiser(mixture, schedule)
    solver = make_solver(args.solver)
    reference = mixture.sample(num, torch.Generator().manual_seed(args.seed + 1))
    floor = sliced_wasserstein2(mixture.sample(num, torch.Generator().manual_seed(args.seed + 2)), reference)
    print(f"analytic teacher of the {args.mixture} mixture, SD 1.5 schedule, {args.solver}, N={num}")
    print(f"{'steps':>6} {'SW2':>8} {'seconds':>8}")
    print(f"{'data':>6} {floor:8.4f} {'-':>8}   (a second draw of the true mixture)")
    rows = []
    for n in steps:
        noise = torch.randn(num, mixture.dim, generator=torch.Generator().manual_seed(args.seed))
        start = time.perf_counter()
        x = sample(teacher, solver, noise, schedule.sampling_grid(n), progress=True)
        seconds = time.perf_counter() - start
        sw2 = sliced_wasserstein2(x, reference)
        rows.append({"steps": n, "sw2": sw2, "seconds": seconds})
        print(f"{n:>6} {sw2:8.4f} {seconds:8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"mixture": args.mixture, "solver": args.solver, "num": num,
                                              "data_sw2": floor, "rows": rows}, indent=2))
    return 0
