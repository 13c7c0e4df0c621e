"""`fewstep sample --model DIR ...`: sample a trained model (a run's final/ directory)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import FewstepError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a trained model into a PNG grid or a safetensors file")
    p.add_argument("--model", required=True, help="a run's final/ directory")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompt", default=None)
    group.add_argument("--prompts", default=None, help="a file with one prompt a line")
    group.add_argument("--class", dest="class_label", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="diffusers' guidance_scale (default: the model's own)")
    p.add_argument("--solver", default=None, help="ddim, euler, heun or dpmpp_2m (default: the model's own)")
    p.add_argument("--out", required=True, help="FILE.png (a grid) or FILE.safetensors (tensor 'samples')")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export import load_final
    from ..io import save_safetensors_atomic
    from ..solvers import make_solver, sample
    from ..viz import save_samples

    out = Path(args.out)
    if out.suffix not in (".png", ".safetensors"):
        raise FewstepError(f"--out must end in .png or .safetensors, got {out.name}")
    if out.exists():
        raise FewstepError(f"{out} exists; choose another --out (nothing is overwritten)")
    if args.num < 1 or (args.steps is not None and args.steps < 1):
        raise FewstepError("--num and --steps must be at least 1")
    den, meta, lp = load_final(args.model)
    sampler = meta["sampler"]
    steps = args.steps or sampler["steps"]
    solver = make_solver(args.solver or sampler["solver"])
    guidance = args.guidance if args.guidance is not None else sampler.get("guidance")
    shape = meta["sample_shape"]
    x = torch.randn(args.num, *shape, generator=torch.Generator().manual_seed(args.seed))
    cond = None
    if lp is not None:
        from ..data.prompts import load_prompts

        prompts = [args.prompt] if args.prompt else load_prompts(args.prompts) if args.prompts else [""]
        cond = lp.encode_prompts([prompts[i % len(prompts)] for i in range(args.num)])
    elif meta.get("null_class") is not None:
        n_cls = meta["null_class"]
        if args.class_label is not None and not 0 <= args.class_label < n_cls:
            raise FewstepError(f"--class must be in 0..{n_cls - 1}, got {args.class_label}")
        labels = torch.full((args.num,), args.class_label) if args.class_label is not None else torch.arange(args.num) % n_cls
        cond = {"class_labels": labels}
    elif args.class_label is not None or args.prompt or args.prompts:
        raise FewstepError("this model is unconditional; drop --class/--prompt/--prompts")
    with torch.no_grad():
        samples = sample(den, solver, x, den.schedule.sampling_grid(steps, sampler.get("spacing")), cond,
                         guidance=guidance if cond is not None else None, progress=True)
        if lp is not None:
            samples = lp.decode_latents(samples)
    if out.suffix == ".png":
        save_samples(samples, out)
    else:
        save_safetensors_atomic({"samples": samples.float().clamp(-1, 1) if samples.ndim == 4 else samples.float()}, out)
    print(f"fewstep: wrote {args.num} samples ({steps} steps) to {out}")
    return 0
