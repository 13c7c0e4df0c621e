"""Values read as their settings declare (fewstep/yaml_core.py and fewstep.config.coerce): generated from the
declarations, every setting of every type is tried with the spellings YAML 1.1 misreads (``1e-4``, ``1E5``, ``no``,
``off``, ``on``, ``~``, ``null``, quoted numbers) on the command line and in a recipe file; every shipped recipe
parses to exactly what ``yaml.safe_load`` gave it."""
from __future__ import annotations

import inspect
import math
import types
from typing import Union, get_args, get_origin, get_type_hints

import pytest
import yaml

from fewstep.cli import main
from fewstep.config import SECTIONS, available_recipes, build_section, coerce, load_recipe, parse_override
from fewstep.errors import FewstepError
from fewstep.losses import loss_class
from fewstep.yaml_core import load_yaml

#: (spelling, the value a setting of that type reads it as); one table per declared type
FLOATS = [("1e-4", 1e-4), ("1E5", 1e5), ("'3'", 3.0), ('"2.5e-3"', 2.5e-3), ("7", 7.0), ("-.5", -0.5)]
INTS = [("1E5", 100_000), ("'12'", 12), ("12", 12), ("1e3", 1000)]
BOOLS = [("no", False), ("off", False), ("on", True), ("yes", True), ("true", True), ("False", False), ("'no'", False)]
STRS = [("no", "no"), ("off", "off"), ("on", "on"), ("yes", "yes"), ("'1e-4'", "1e-4"), ("1e-4", "0.0001")]
NULLS = [("~", None), ("null", None), ("Null", None)]


def _base(tp):
    """(the non-null type of an annotation, whether it takes null)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        base = args[0] if len(args) == 1 else float if float in args else tp  # torch's lr: Union[float, Tensor]
        return base, type(None) in get_args(tp)
    return tp, False


def _spellings(tp):
    base, nullable = _base(tp)
    table = {float: FLOATS, int: INTS, bool: BOOLS, str: STRS}.get(base, [])
    return table + (NULLS if nullable else [])


def _declared():
    """(key, annotation) of every scalar setting of every fixed section."""
    for section, cls in SECTIONS.items():
        for name, tp in get_type_hints(cls).items():
            if _spellings(tp):
                yield f"{section}.{name}", cls, name, tp


DECLARED = list(_declared())


def _same(a, b):
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-15)))


@pytest.mark.parametrize("key,cls,name,tp", DECLARED, ids=[d[0] for d in DECLARED])
def test_every_fixed_setting_reads_the_trap_spellings_as_its_type(key, cls, name, tp, tmp_path):
    assert len(DECLARED) > 60
    for spelling, want in _spellings(tp):
        from_cli = parse_override(f"{key}={spelling}")[1]
        from_file = load_yaml(f"{name}: {spelling}\n")[name]
        for where, value in (("command line", from_cli), ("recipe file", from_file)):
            got = getattr(build_section(cls, {name: value}, key.split(".")[0]), name)
            assert _same(got, want), f"{key}={spelling} on the {where}: {got!r}, want {want!r}"


def _constructor_settings():
    """(key, function, name, annotation): loss, data and optimizer keyword sections, as check_kwargs reads them."""
    from fewstep.build.data import DATA
    from fewstep.build.optim import optimizer_classes
    from fewstep.losses import LOSSES

    targets = [(f"loss[{n}]", loss_class(n)) for n in LOSSES] + [(f"data[{n}]", f) for n, f in DATA.items()]
    targets += [(f"optimizer[{n}]", c) for n, c in optimizer_classes().items() if n in ("AdamW", "SGD")]
    for label, fn in targets:
        target = fn.__init__ if inspect.isclass(fn) else fn
        try:
            hints = get_type_hints(target)
        except Exception:
            hints = {}
        for name, p in inspect.signature(target).parameters.items():
            tp = hints.get(name, p.annotation)
            if name not in ("self", "params") and _spellings(tp):
                yield label, fn, name, tp


CONSTRUCTED = list(_constructor_settings())


@pytest.mark.parametrize("label,fn,name,tp", CONSTRUCTED, ids=[f"{c[0]}.{c[2]}" for c in CONSTRUCTED])
def test_every_loss_data_and_optimizer_setting_reads_the_trap_spellings_as_its_type(label, fn, name, tp):
    for spelling, want in _spellings(tp):
        for value in (parse_override(f"x.{name}={spelling}")[1], load_yaml(f"{name}: {spelling}")[name]):
            got = coerce(value, tp, f"{label}.{name}")  # what check_kwargs does with the constructor's declaration
            assert _same(got, want), f"{label}.{name}={spelling}: {got!r}, want {want!r}"


def test_the_declarations_cover_the_sections_that_had_none():
    labels = {c[0].split("[")[0] for c in CONSTRUCTED}
    assert labels == {"loss", "data", "optimizer"} and len(CONSTRUCTED) > 80
    assert any(c[0] == "optimizer[AdamW]" and c[2] == "lr" for c in CONSTRUCTED)


def test_a_value_that_is_not_its_type_is_one_line_naming_it():
    with pytest.raises(FewstepError, match=r"^train.max_steps: expected an integer, got 'many'$"):
        load_recipe("gmm_teacher", ["train.max_steps=many"])
    with pytest.raises(FewstepError, match=r"^train.overwrite: expected true or false \(or yes/no, on/off\), got 'maybe'$"):
        load_recipe("gmm_teacher", ["train.overwrite=maybe"])
    with pytest.raises(FewstepError, match=r"train.max_steps: expected an integer, got 1.5"):
        load_recipe("gmm_teacher", ["train.max_steps=1.5"])


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_shipped_recipe_parses_as_it_did(name):
    path = available_recipes()[name]
    assert load_yaml(path.read_text()) == yaml.safe_load(path.read_text())


def test_the_commonest_spellings_run(tmp_path, capsys):
    recipe = load_recipe("gmm_cd", ["optimizer.lr=1e-4", "train.mixed_precision=no"])
    assert recipe.train.mixed_precision == "no" and recipe.optimizer["lr"] == 1e-4
    assert main(["distill", "gmm_cd", "optimizer.lr=1e-4", "train.mixed_precision=no", "train.max_steps=2",
                 "train.progress=false", f"train.output_dir={tmp_path / 'run'}"]) == 0
    file = tmp_path / "r.yaml"  # the same spellings inside a recipe file
    raw = yaml.safe_load(available_recipes()["gmm_teacher"].read_text())
    raw.pop("optimizer", None)
    for key in ("mixed_precision", "max_steps", "progress", "output_dir"):
        raw.setdefault("train", {}).pop(key, None)
    file.write_text(yaml.safe_dump(raw) + "optimizer: {name: AdamW, lr: 1e-3, weight_decay: '0'}\n"
                    "lr_scheduler: {name: constant, warmup_steps: '0'}\n")
    text = file.read_text().replace("train:\n", "train:\n  mixed_precision: no\n  max_steps: 1E0\n", 1)
    file.write_text(text)
    recipe = load_recipe(str(file))
    assert recipe.raw["optimizer"]["lr"] == 1e-3 and recipe.train.mixed_precision == "no" and recipe.train.max_steps == 1
    assert main(["distill", str(file), "train.progress=false", f"train.output_dir={tmp_path / 'file'}"]) == 0
