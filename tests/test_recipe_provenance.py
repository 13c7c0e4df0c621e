"""docs/recipes.md "Provenance of the SD recipes": every sd15_/sdxl_/sd3_/sd35_/flux_ recipe has a table, and every row that
names a recipe key states the value the recipe file has (stages resolved as fewstep runs them, defaults filled in
from the loss class and the recipe sections), so the tables and the recipes cannot drift apart."""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import yaml

from fewstep.config import available_recipes, load_recipe
from fewstep.losses import loss_class
from fewstep.run import stage_recipes

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
SD = tuple(sorted(n for n in available_recipes() if n.startswith(("sd15_", "sdxl_", "sd3_", "sd35_", "flux_"))))
#: what every SD table must cover (a row whose key ends so, in the base or a stage)
REQUIRED = ("optimizer.lr", "optimizer.betas", "train.batch_size", "train.launch_processes", "train.max_steps",
            "train.ema_decay")


def tables() -> dict[str, list[dict[str, str]]]:
    """{recipe: rows} from the provenance section; a row: setting, key, this recipe, published, source, why."""
    text = DOC.read_text()
    section = text[text.index("## Provenance of the SD recipes"):]
    out: dict[str, list[dict[str, str]]] = {}
    name = None
    for line in section.splitlines():
        if line.startswith("### "):
            name = line[4:].strip()
            out[name] = []
        elif name and line.startswith("|") and not line.startswith("|---") and not line.startswith("| setting"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 6, f"{name}: a row needs 6 cells: {line}"
            out[name].append(dict(zip(("setting", "key", "value", "published", "source", "why"), cells)))
    return out


def _get(mapping, parts):
    for p in parts:
        if not isinstance(mapping, dict) or p not in mapping:
            raise KeyError(".".join(parts))
        mapping = mapping[p]
    return mapping


def resolve(name: str, key: str):
    """The value fewstep runs with for ``key`` (``stages.NAME.`` for a stage) of recipe ``name``."""
    recipe = load_recipe(name)
    if key.startswith("stages."):
        _, stage, key = key.split(".", 2)
        recipe = {n: r for n, _, r in stage_recipes(recipe)}[stage]
    raw, parts = recipe.raw, key.split(".")
    if parts[0] == "loss":
        return raw["loss"][parts[1]] if parts[1] in raw["loss"] else loss_class(raw["loss"]["name"]).settings()[parts[1]]
    if parts[0] in ("optimizer", "optimizers"):
        opt = dict(raw.get("optimizer") or {})
        if parts[0] == "optimizers":
            opt.update((raw.get("optimizers") or {}).get(parts[1]) or {})
            parts = ["optimizer", parts[2]]
        if parts[1] in opt:
            return opt[parts[1]]
        import torch

        return inspect.signature(getattr(torch.optim, opt.get("name", "AdamW"))).parameters[parts[1]].default
    try:
        return _get(raw, parts)
    except KeyError:
        value = recipe
        for p in parts:
            value = getattr(value, p)
        return value


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def test_every_sd_recipe_has_a_provenance_table_covering_the_required_settings():
    found = tables()
    assert sorted(n for n in found if n in SD) == list(SD), f"SD recipes without a table: {set(SD) - set(found)}"
    for name in SD:
        keys = [r["key"].strip("`") for r in found[name]]
        for need in REQUIRED:
            assert any(k == need or k.endswith("." + need) for k in keys), f"{name}: no row for {need}"
        lrs = {k for k in keys if k.endswith(".lr")}
        for phase, spec in (load_recipe(name).raw.get("optimizers") or {}).items():
            assert any(k.endswith(f"optimizers.{phase}.lr") for k in lrs), f"{name}: no row for optimizers.{phase}.lr"
        for row in found[name]:
            assert row["published"] and row["source"] or row["published"].startswith("not"), (name, row["setting"])


@pytest.mark.parametrize("name", SD)
def test_provenance_table_values_are_the_recipe_values(name):
    rows = [r for r in tables()[name] if r["key"] not in ("—", "")]
    assert rows
    for row in rows:
        key = re.fullmatch(r"`([^`]+)`", row["key"])
        assert key, f"{name}: key cell must be one `recipe.key`: {row['key']}"
        stated = yaml.safe_load(row["value"])
        actual = resolve(name, key.group(1))
        assert same(stated, actual), f"{name} {key.group(1)}: table says {stated!r}, the recipe runs {actual!r}"


def test_a_drifted_value_is_caught(tmp_path):
    """The check can fail: a table value that differs from the recipe is reported."""
    assert not same(yaml.safe_load("1.0e-5"), resolve("sd15_dmd", "stages.gan.optimizer.lr"))
    assert same(yaml.safe_load("[0.9, 0.999]"), resolve("sd15_dmd", "optimizer.betas"))


@pytest.mark.parametrize("name", SD)
def test_every_batch_row_states_per_gpu_and_global_and_the_recipe_starts_on_its_launch(name):
    """A published batch is read per GPU (diffusers' scripts, DMD2, FastGen's dataloader) or in all (FastGen's
    batch_size_global); fewstep's train.batch_size is always in all. Each batch row says both, and each stage's
    batch splits over the launch its table documents (train.launch_processes), so the documented launch starts."""
    rows = [r for r in tables()[name] if r["key"].strip("`").endswith("train.batch_size")]
    assert rows, name
    for row in rows:
        text = f"{row['published']} {row['why']}"
        assert "per GPU" in text and "global" in text, (name, row)
    for stage, kind, sub in stage_recipes(load_recipe(name)) or [(name, "distill", load_recipe(name))]:
        if kind != "pairs":
            tr = sub.train
            assert tr.batch_size % tr.launch_processes == 0, (name, stage, tr.batch_size, tr.launch_processes)
