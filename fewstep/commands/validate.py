"""`fewstep validate RECIPE [key=value ...]`: check a recipe without loading models or data."""
from __future__ import annotations

import argparse

from ..config import load_recipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a recipe (names, keys, types, paths) without running it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..run import check_stages, check_writable

    recipe = load_recipe(args.recipe, args.overrides)
    check_stages(recipe)
    check_writable(Path(recipe.train.output_dir))
    print(f"{args.recipe}: ok")
    return 0
