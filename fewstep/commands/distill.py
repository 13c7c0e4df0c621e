"""`fewstep distill RECIPE [key=value ...] [--dry-run]`: run a recipe (also trains teachers)."""
from __future__ import annotations

import argparse

import torch

from ..config import load_recipe

EXIT = {"finished": 0, "interrupted": 130, "time_limit": 75}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="run a recipe: train a teacher or distill a student")
    p.add_argument("recipe", help="a recipe name (see `fewstep ls`) or a path to a .yaml file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe, parameter counts and a memory estimate")
    p.set_defaults(run=run)


def _count(module) -> tuple[int, int]:
    if module is None:
        return 0, 0
    params = list(module.parameters())
    train = sum(p.numel() for p in params if p.requires_grad)
    return train, sum(p.numel() for p in params) - train


def dry_run(recipe) -> int:
    from ..builders import build

    b = build(recipe)
    print(recipe.to_yaml().rstrip())
    print("---")
    rows = [("student", b.student.denoiser.net), ("teacher", getattr(b.teacher.denoiser, "net", None)),
            *b.loss.modules_to_train().items()]
    total_bytes = 0.0
    optimizer_states = {"Adam": 2, "AdamW": 2, "SGD": 1, "Adagrad": 1, "RMSprop": 1}
    for name, module in rows:
        trainable, frozen = _count(module)
        if module is None:
            continue
        bytes_per = next(iter(module.parameters()), torch.zeros(())).element_size()
        print(f"{name:>12}: {trainable:,} trainable, {frozen:,} frozen parameters")
        total_bytes += (trainable + frozen) * bytes_per + trainable * 4  # weights + fp32 gradients
    trainable_all = sum(_count(m)[0] for _, m in rows)
    opt_name = recipe.optimizer["name"]
    total_bytes += trainable_all * 4 * optimizer_states.get(opt_name, 2)
    if recipe.train.ema_decay is not None:
        total_bytes += _count(b.student.denoiser.net)[0] * 4
    print(f"memory estimate (weights, gradients, {opt_name} state, EMA; activations excluded): {total_bytes / 2**30:.3f} GiB")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..run import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        return dry_run(recipe)
    result = run_recipe(recipe)
    where = f"; final model in {result.final_dir}" if result.final_dir else ""
    messages = {"finished": f"finished at step {result.step}{where}",
                "interrupted": f"interrupted at step {result.step}; checkpoint {result.checkpoint}; run the same command to resume",
                "time_limit": f"stopped at train.max_wall_time, step {result.step}; run the same command to resume"}
    print(f"fewstep: {messages[result.status]}")
    return EXIT[result.status]
