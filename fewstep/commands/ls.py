"""`fewstep ls`: the recipes that ship in recipes/, one line each."""
from __future__ import annotations

import argparse

from ..config import available_recipes
from ..yaml_core import load_yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the recipes in recipes/ with one line each")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    recipes = available_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, path in recipes.items():
        raw = load_yaml(path.read_text()) or {}
        print(f"{name:<{width}}  {str(raw.get('description', '')).strip().splitlines()[0] if raw.get('description') else ''}")
    return 0
