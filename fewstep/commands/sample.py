"""`fewstep sample --model DIR ...`: sample a trained model (a run's final/ directory)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FewstepError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a trained model into a PNG grid or a safetensors file")
    p.add_argument("--model", required=True, help="a run's final/ directory, or a plain diffusers pipeline (directory or hub id)")
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


def prompts_from(args: argparse.Namespace) -> list[str] | None:
    from ..data.prompts import load_prompts

    return [args.prompt] if args.prompt else load_prompts(args.prompts) if args.prompts else None


def run(args: argparse.Namespace) -> int:
    from ..generate import Generator
    from ..io import save_safetensors_atomic
    from ..viz import save_samples

    out = Path(args.out)
    if out.suffix not in (".png", ".safetensors"):
        raise FewstepError(f"--out must end in .png or .safetensors, got {out.name}")
    if out.exists():
        raise FewstepError(f"{out} exists; choose another --out (nothing is overwritten)")
    gen = Generator.load(args.model)
    samples = gen(args.num, seed=args.seed, steps=args.steps, solver=args.solver, guidance=args.guidance,
                  class_label=args.class_label, prompts=prompts_from(args), progress=True)
    if out.suffix == ".png":
        save_samples(samples, out)
    else:
        save_safetensors_atomic({"samples": samples.float()}, out)
    print(f"fewstep: wrote {args.num} samples ({args.steps or gen.meta['sampler']['steps']} steps) to {out}")
    return 0
