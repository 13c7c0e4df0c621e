"""Running a recipe: the run directory's rules, multi-stage chaining, and dry runs.

Run directory (``train.output_dir``): ``recipe.yaml`` (the resolved recipe), ``log.jsonl``,
``checkpoints/``, ``samples/``, ``final/``. A directory that holds a run of a different recipe
(different in more than run-length keys such as ``train.max_steps``) is refused unless
``train.overwrite=true``, which starts the run over.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import Recipe, same_run, validate
from .errors import FewstepError
from .io import write_text_atomic
from .loop import Loop, LoopResult

RUN_FILES = ("checkpoints", "final", "best", "samples", "log.jsonl", "recipe.yaml", ".final.tmp", ".best.tmp", "DONE")
STAGE_KINDS = ("distill",)


def prepare_run_dir(recipe: Recipe) -> Path:
    """Check ``train.output_dir`` against the recipe; clear it when overwriting; save the resolved recipe."""
    out = Path(recipe.train.output_dir)
    saved = out / "recipe.yaml"
    overwrite = recipe.train.overwrite
    if saved.exists():
        old = yaml.safe_load(saved.read_text()) or {}
        diff = same_run(old, recipe.raw)
        if diff and not overwrite:
            shown = ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "")
            raise FewstepError(f"{out} holds a run of a different recipe (differs in {shown}); choose another "
                               f"train.output_dir or set train.overwrite=true to start over")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise FewstepError(f"{out} exists, is not empty and holds no fewstep run; choose another train.output_dir "
                           f"or set train.overwrite=true")
    if overwrite:
        for name in RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif recipe.train.resume == "none" and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise FewstepError(f"{out} holds checkpoints and train.resume=none; set train.resume=auto to continue "
                           f"or train.overwrite=true to start over")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recipe.to_yaml(), saved)
    return out


def build_loop(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None, log: Callable[[str], None] = print,
               evaluate=None) -> Loop:
    from .builders import build
    from .viz import save_samples

    b = build(recipe, stage_outputs=stage_outputs)
    evaluate = evaluate or b.evaluate
    return Loop(student=b.student.denoiser, teacher=b.teacher.denoiser, loss=b.loss, dataset=b.dataset,
                settings=b.settings, optimizers=b.optimizers, prepare=b.prepare, sample_fn=b.sample_fn,
                save_samples=save_samples, evaluate=evaluate, export=b.export, fingerprint={"recipe": recipe.name}, log=log)


def run_single(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None, log: Callable[[str], None] = print) -> LoopResult:
    prepare_run_dir(recipe)
    result = build_loop(recipe, stage_outputs=stage_outputs, log=log).run()
    if result.status == "finished":
        (Path(recipe.train.output_dir) / "DONE").write_text(f"{result.step}\n")
    return result


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def stage_recipes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """Each stage as a full recipe: the base recipe with the stage's keys merged in, output in output_dir/NAME."""
    base = {k: v for k, v in recipe.raw.items() if k != "stages"}
    out = []
    for stage in recipe.stages:
        stage = dict(stage)
        name = str(stage.pop("name"))
        kind = stage.pop("kind", "distill")
        if kind not in STAGE_KINDS:
            raise FewstepError(f"stage {name}: unknown kind {kind!r}; valid: {', '.join(STAGE_KINDS)}")
        raw = merge(base, stage)
        raw.setdefault("train", {})
        raw["train"] = {**raw["train"], "output_dir": str(Path(recipe.train.output_dir) / name)}
        raw["name"] = f"{recipe.name}/{name}"
        out.append((name, validate(raw)))
    return out


def run_recipe(recipe: Recipe, *, log: Callable[[str], None] = print) -> LoopResult:
    """Run a recipe; with stages, run each in order, skipping stages already finished."""
    if not recipe.stages:
        return run_single(recipe, log=log)
    prepare_run_dir(recipe)
    outputs: dict[str, Path] = {}
    result = None
    for name, sub in stage_recipes(recipe):
        out = Path(sub.train.output_dir)
        if (out / "DONE").exists() and (out / "final").is_dir():
            log(f"fewstep: stage {name} already finished, skipping")
            outputs[name] = out
            continue
        log(f"fewstep: stage {name}")
        result = run_single(sub, stage_outputs=outputs, log=log)
        outputs[name] = out
        if result.status != "finished":
            return result
    if result is None:
        last = Path(recipe.train.output_dir) / recipe.stages[-1]["name"]
        return LoopResult(int((last / "DONE").read_text()), "finished", None, last / "final")
    return result
