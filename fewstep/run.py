"""Running a recipe: the run directory's rules, multi-stage chaining, and dry runs.

Run directory (``train.output_dir``): ``recipe.yaml`` (the resolved recipe), ``log.jsonl``,
``checkpoints/``, ``samples/``, ``final/``. A recipe with stages runs each in ``RUN/NAME/`` and, when the
last one has finished, points ``RUN/final`` at ``RUN/LAST/final`` (a relative symlink). A directory that holds a run of a different recipe
(different in more than run-length keys such as ``train.max_steps``) is refused unless
``train.overwrite=true``, which starts the run over.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from . import runlock
from .config import (RUN_LENGTH_KEYS, Recipe, apply_overrides, load_recipe, parse_override, run_differences,
                     split_stage_overrides, stage_override, validate)
from .errors import FewstepError
from .io import write_text_atomic
from .loop import Loop, LoopResult
from .yaml_core import load_yaml

RUN_FILES = ("checkpoints", "final", "best", "samples", "log.jsonl", "recipe.yaml", ".final.tmp", ".best.tmp", "DONE", "pairs",
             ".final.link.tmp")
STAGE_KINDS = ("distill", "pairs", "recipe")


def processes():
    """accelerate's view of the processes of this launch (one, unless started by accelerate launch/torchrun)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def prepare_run_dir(recipe: Recipe) -> Path:
    """Check ``train.output_dir`` against the recipe (every process); then the main process clears it when
    overwriting and saves the resolved recipe, while the others wait."""
    state = processes()
    out = check_run_dir(recipe)
    state.wait_for_everyone()  # all have looked before the main process writes
    refused = None
    if state.is_main_process:  # one live run per directory: the launch's main process holds the lock
        out.mkdir(parents=True, exist_ok=True)
        try:
            runlock.acquire(out)
        except FewstepError as e:
            refused = str(e)
    refused = from_main(state, refused)
    if refused is not None:
        raise FewstepError(refused)
    if state.is_main_process:
        _write_run_dir(recipe)
    state.wait_for_everyone()
    return out


def from_main(state, value):
    """The main process's ``value`` on every process of the launch."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def mark_done(recipe: Recipe, text: str) -> None:
    """Write the run's DONE marker (main process)."""
    state = processes()
    if state.is_main_process:
        (Path(recipe.train.output_dir) / "DONE").write_text(text)
    state.wait_for_everyone()


def check_writable(out: Path, key: str = "train.output_dir") -> None:
    """Refuse a directory that cannot be created or written, by creating (and removing) a temporary
    directory in its nearest existing ancestor: permission bits alone do not tell (root, /proc, read-only
    mounts)."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise FewstepError(f"{key} {out} is a file, not a directory; choose another {key}")
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise FewstepError(f"{key} {out} cannot be created: {probe} is not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".fewstep-probe-", dir=probe)).rmdir()
    except OSError as e:
        raise FewstepError(f"{key} {out} cannot be created or written ({e.strerror} in {probe}); choose another "
                           f"{key}") from None


def check_run_dir(recipe: Recipe) -> Path:
    """Refuse a ``train.output_dir`` that holds something else than this recipe's run, or that cannot be
    created (writes nothing)."""
    out = Path(recipe.train.output_dir)
    check_writable(out)
    saved = out / "recipe.yaml"
    overwrite = recipe.train.overwrite
    if saved.exists():
        old = load_yaml(saved.read_text()) or {}
        diff = run_differences(old, recipe.raw)
        if diff and not overwrite:
            shown = ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "")
            raise FewstepError(f"{out} holds a run of a different recipe (differs in {shown}); choose another "
                               f"train.output_dir or set train.overwrite=true to start over")
    elif out.exists() and any(p.name != runlock.LOCK_NAME for p in out.iterdir()) and not overwrite:
        raise FewstepError(f"{out} exists, is not empty and holds no fewstep run; choose another train.output_dir "
                           f"or set train.overwrite=true")
    if not overwrite and recipe.train.resume == "none" and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise FewstepError(f"{out} holds checkpoints and train.resume=none; set train.resume=auto to continue "
                           f"or train.overwrite=true to start over")
    return out


def _write_run_dir(recipe: Recipe) -> None:
    out = Path(recipe.train.output_dir)
    if recipe.train.overwrite:
        for name in RUN_FILES:
            p = out / name
            if p.is_symlink():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recipe.to_yaml(), out / "recipe.yaml")


def build_loop(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None, log: Callable[[str], None] = print,
               evaluate=None) -> Loop:
    from .build import build
    from .viz import save_samples

    b = build(recipe, stage_outputs=stage_outputs)
    return Loop(student=b.student.denoiser, teacher=b.teacher.denoiser, loss=b.loss, dataset=b.dataset,
                settings=b.settings, optimizers=b.optimizers, lr_schedulers=b.lr_schedulers, prepare=b.prepare,
                sample_fn=b.sample_fn, save_samples=save_samples, evaluate=evaluate or b.evaluate,
                best_metric=b.best_metric, export=b.export, fingerprint={"recipe": recipe.name}, frozen=b.frozen,
                log=log)


def run_single(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None, log: Callable[[str], None] = print,
               on_built: Callable[[], None] = lambda: None) -> LoopResult:
    """Build, then (``on_built``, e.g. the multi-stage run's directory) write the run directory, then train."""
    check_run_dir(recipe)  # before the (possibly slow) build
    loop = build_loop(recipe, stage_outputs=stage_outputs, log=log)  # a recipe that cannot build leaves no trace
    on_built()
    prepare_run_dir(recipe)
    result = loop.run()
    if result.status == "finished":
        mark_done(recipe, f"{result.step}\n")
    return result


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def merge_stage(base: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    """A stage's recipe: ``merge``, except that a section naming another ``name`` (loss, data, ...) or
    ``kind`` (teacher, student) replaces the base's section instead of merging into it."""
    base = dict(base)
    for key, value in stage.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            for tag in ("name", "kind"):
                if tag in value and tag in old and value[tag] != old[tag]:
                    base.pop(key)
                    break
    return merge(base, stage)


def stage_recipes(recipe: Recipe) -> list[tuple[str, str, Recipe]]:
    """Each stage as (name, kind, full recipe), output in output_dir/NAME.

    Kinds: ``distill`` (the default) and ``pairs`` merge the stage's keys into the base recipe;
    ``recipe`` runs another recipe (``recipe: NAME``) with the stage's other keys merged into it.
    Command-line overrides change the base recipe and, where a stage restates the same key of the same section
    itself, that stage too (the command line wins: ``loss.fake_updates=1`` reaches sd15_dmd's gan stage; not a
    stage's other loss or model, nor its ``stage:NAME`` references: ``_shadows``); run-length
    keys (``train.max_steps``, ``train.resume``, ...) apply to every stage; ``stages.NAME.KEY=VALUE`` applies to
    stage NAME over its own keys.
    """
    base = {k: v for k, v in recipe.raw.items() if k != "stages"}
    plain, staged = split_stage_overrides(recipe.overrides)
    run_length = [o for o in plain if ".".join(parse_override(o)[0]) in RUN_LENGTH_KEYS]
    out = []
    for stage in recipe.stages:
        stage = dict(stage)
        name = str(stage.pop("name"))
        kind = stage.pop("kind", "distill")
        if kind not in STAGE_KINDS:
            raise FewstepError(f"stage {name}: unknown kind {kind!r}; valid: {', '.join(STAGE_KINDS)}")
        if kind == "recipe":
            if "recipe" not in stage:
                raise FewstepError(f"stage {name}: kind recipe needs recipe: NAME (see `fewstep ls`)")
            # the other recipe's own training; its stages do not run here, and its stage:NAME references
            # name this recipe's stages (list the stages it needs before it)
            other = load_recipe(str(stage.pop("recipe")))
            raw = merge_stage({k: v for k, v in other.raw.items() if k != "stages"}, stage)
        else:
            raw = merge_stage(base, stage)
        shadowed = [o for o in plain if o not in run_length and kind != "recipe"
                    and _shadows(base, stage, parse_override(o)[0])]
        raw = apply_overrides(raw, run_length + shadowed + [o for n, o in map(stage_override, staged) if n == name])
        raw.setdefault("train", {})
        raw["train"] = {**raw["train"], "output_dir": str(Path(recipe.train.output_dir) / name)}
        raw["name"] = f"{recipe.name}/{name}"
        sub = validate(raw)
        out.append((name, "pairs" if kind == "pairs" else "distill", sub))
    return out


def _shadows(base: dict[str, Any], stage: dict[str, Any], parts: list[str]) -> bool:
    """Whether a stage's own keys restate the dotted key ``parts`` of the base recipe's same section: not when the
    stage's section is another one (another loss ``name``, model ``kind``: merge_stage replaces it), nor when its
    value names an earlier stage (``stage:NAME``)."""
    own, top = stage.get(parts[0]), base.get(parts[0])
    if isinstance(own, dict) and isinstance(top, dict) and any(
            tag in own and tag in top and own[tag] != top[tag] for tag in ("name", "kind")):
        return False
    value: Any = stage
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return not (isinstance(value, str) and value.startswith("stage:"))


def check_stages(recipe: Recipe) -> list[tuple[str, str, Recipe]]:
    """Check a recipe (each of its stages, if it has any) without loading models or data; return its stages."""
    from .build import check_pairs, check_recipe

    if not recipe.stages:
        check_recipe(recipe)
    stages = stage_recipes(recipe)
    for _, kind, sub in stages:
        (check_pairs if kind == "pairs" else check_recipe)(sub)
    return stages


def run_pairs_stage(recipe: Recipe, *, stage_outputs: dict[str, Path], log: Callable[[str], None] = print,
                    on_built: Callable[[], None] = lambda: None) -> None:
    """A stage of kind pairs: its teacher built, its run directory, its pairs, then its DONE marker."""
    from .build import pairs_job

    check_run_dir(recipe)
    job = pairs_job(recipe, stage_outputs=stage_outputs)  # a teacher that cannot load leaves no trace
    on_built()
    prepare_run_dir(recipe)
    run_pairs(recipe, stage_outputs=stage_outputs, progress=recipe.train.progress, log=log, job=job)
    mark_done(recipe, "pairs\n")


def pairs_dir(output_dir: str | Path) -> Path:
    """Where a run (or a pairs stage) keeps its pairs."""
    return Path(output_dir) / "pairs"


def run_pairs(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None, progress: bool = True,
              log: Callable[[str], None] = print, job: dict | None = None) -> Path:
    """Generate (or finish) the recipe's pairs in output_dir/pairs, split across accelerate's processes
    (``job``: the built ``pairs_job``, when the caller built it already)."""
    from .build import pairs_job
    from .pairs import generate_pairs

    state = processes()
    job = job if job is not None else pairs_job(recipe, stage_outputs=stage_outputs)
    directory = pairs_dir(recipe.train.output_dir)
    written = generate_pairs(directory=directory, rank=state.process_index, world_size=state.num_processes,
                             device=state.device, progress=progress and state.is_main_process, **job)
    state.wait_for_everyone()
    log(f"fewstep: pairs in {directory} ({len(written)} shards written by process {state.process_index})")
    return directory


def run_recipe(recipe: Recipe, *, log: Callable[[str], None] = print) -> LoopResult:
    """Run a recipe; with stages, run each in order, skipping stages already finished. The run holds its
    directories' locks (fewstep/runlock.py) until it returns."""
    with runlock.scope():
        return _run_recipe(recipe, log=log)


def _run_recipe(recipe: Recipe, *, log: Callable[[str], None] = print) -> LoopResult:
    if not recipe.stages:
        return run_single(recipe, log=log)
    stages = check_stages(recipe)  # a typo in the last stage is refused before the first one trains
    check_run_dir(recipe)
    written = []

    def write_run_dir() -> None:  # once the first stage to run has built: a bad model path leaves no trace
        if not written:
            prepare_run_dir(recipe)
            written.append(True)

    outputs: dict[str, Path] = {}
    result = None
    for name, kind, sub in stages:
        out = Path(sub.train.output_dir)
        if (out / "DONE").exists() and ((out / "final").is_dir() or kind == "pairs"):
            log(f"fewstep: stage {name} already finished, skipping")
            outputs[name] = out
            continue
        log(f"fewstep: stage {name}")
        if kind == "pairs":
            run_pairs_stage(sub, stage_outputs=outputs, log=log, on_built=write_run_dir)
            outputs[name] = out
            continue
        result = run_single(sub, stage_outputs=outputs, log=log, on_built=write_run_dir)
        outputs[name] = out
        if result.status != "finished":
            return result
    last = Path(recipe.train.output_dir) / recipe.stages[-1]["name"]
    # a recipe that ends with a pairs stage has no model: no link (it would dangle)
    final = link_final(Path(recipe.train.output_dir), last / "final") if (last / "final").is_dir() else None
    if result is None:
        return LoopResult(int((last / "DONE").read_text()), "finished", None, final)
    return LoopResult(result.step, result.status, result.checkpoint, final or result.final_dir)


def link_final(run: Path, stage_final: Path) -> Path:
    """``RUN/final``: a relative symlink to the last stage's ``final/`` (main process), so a multi-stage run's
    model is where a single-stage run's is. A real directory already there is left as it is."""
    link = run / "final"
    state = processes()
    if state.is_main_process and (link.is_symlink() or not link.exists()):
        tmp = run / ".final.link.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(stage_final.relative_to(run), target_is_directory=True)
        tmp.replace(link)  # atomic: never a missing or half-made link
    state.wait_for_everyone()
    return link
