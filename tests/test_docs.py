"""The docs cover the whole surface: every recipe key (sections, losses, data sources) in docs/recipes.md,
every CLI verb in docs/cli.md."""
import dataclasses
import inspect
import re
from pathlib import Path

from fewstep.build import DATA
from fewstep.cli import build_parser
from fewstep.config import NAMED_SECTIONS, SECTIONS, TOP_KEYS
from fewstep.losses import LOSSES

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _keys(fn, skip=()) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.name not in skip and p.name != "self" and p.kind is not p.VAR_KEYWORD}


def test_every_recipe_key_is_documented():
    text = (DOCS / "recipes.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", text))
    wanted = {f"top-level {k}": k for k in TOP_KEYS} | {f"section {k}": k for k in NAMED_SECTIONS}
    for name, cls in SECTIONS.items():
        wanted |= {f"{name}.{f.name}": f.name for f in dataclasses.fields(cls)}
    for name, cls in LOSSES.items():
        wanted |= {f"loss {name}": name} | {f"loss {name}.{k}": k for k in _keys(cls.__init__, cls.provided)}
    for name, fn in DATA.items():
        wanted |= {f"data {name}": name} | {f"data {name}.{k}": k for k in _keys(fn, ("stage_outputs",))}
    missing = sorted(where for where, key in wanted.items() if key not in documented)
    assert not missing, f"undocumented recipe keys: {missing}"


def test_every_cli_verb_is_documented():
    text = (DOCS / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [verb for verb in sub.choices if f"`fewstep {verb}" not in text]
    assert not missing, f"undocumented commands: {missing}"
