"""`fewstep pairs RECIPE [key=value ...] [--stage NAME]`: teacher pairs for reflow, resumable and
split across processes under `accelerate launch`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_recipe
from ..errors import FewstepError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pairs", help="generate (noise, teacher ODE endpoint, condition) pairs for reflow")
    p.add_argument("recipe", help="a recipe with teacher, data and pairs sections (or pairs stages)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. pairs.num=50000 pairs.steps=25")
    p.add_argument("--stage", help="for a recipe with stages: the pairs stage to run (default: the first); "
                                   "the stages it reads must have finished")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runlock import scope

    with scope():  # the run directory's lock, released when the pairs are written (fewstep/runlock.py)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..build import check_pairs
    from ..run import prepare_run_dir, run_pairs, run_pairs_stage, stage_recipes

    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.stages:
        if args.stage:
            raise FewstepError(f"--stage {args.stage}: recipe {recipe.name} has no stages")
        check_pairs(recipe)  # refused before the run directory exists
        prepare_run_dir(recipe)
        run_pairs(recipe, progress=recipe.train.progress)
        return 0
    stages = stage_recipes(recipe)
    names = [n for n, kind, _ in stages if kind == "pairs"]
    if not names:
        raise FewstepError(f"recipe {recipe.name} has no pairs stage")
    name = args.stage or names[0]
    if name not in names:
        raise FewstepError(f"unknown pairs stage {name!r}; valid: {', '.join(names)}")
    outputs: dict[str, Path] = {}
    for stage_name, _, sub in stages:
        if stage_name == name:
            run_pairs_stage(sub, stage_outputs=outputs)
            return 0
        out = Path(sub.train.output_dir)
        if (out / "DONE").exists():
            outputs[stage_name] = out
    return 0
