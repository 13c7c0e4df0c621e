"""The one place that reads a recipe and builds objects, passing plain arguments to each component.

``build(recipe)`` is the entry point; each piece it calls lives in its own module and reads alone:
checks (every name, before anything loads), schedule, models (teacher, student), loss, data, optim
(one optimizer and LR schedule per phase), sample (grids, evaluation, export), pairs (teacher pairs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import Recipe, check_kwargs
from ..denoisers import Denoiser
from ..errors import FewstepError, lookup
from ..losses.base import DistillationLoss, Models
from ..networks import TrainedNetworks, freeze_teacher
from ..settings import LoopSettings
from ..schedules import Schedule
from .checks import check_pairs, check_recipe
from .data import DATA, RUN_DRAWS, build_data, check_captions, make_prepare, prompts_first, run_draws, table_prompts
from .loss import build_loss, check_data
from .models import LoadedModel, build_model, cast_frozen, cast_teacher, frozen_parts, sample_shape
from .optim import PhaseOptimizer, build_optimizers, optimizer_classes
from .pairs import pairs_job
from .resolve import split_named
from .sample import make_evaluate, make_export, make_sample_fn, sampler_settings
from .schedule import schedule_from


@dataclass
class BuiltRun:
    """Every object of one run, ready for the loop."""

    recipe: Recipe
    schedule: Schedule
    teacher: LoadedModel
    student: LoadedModel
    loss: DistillationLoss
    dataset: Any
    settings: LoopSettings
    optimizers: dict[str, torch.optim.Optimizer]
    lr_schedulers: dict[str, Any]
    prepare: Callable[[dict], dict] | None
    sample_fn: Callable[[Denoiser], Tensor] | None
    export: Callable[[Denoiser, Path], None]
    evaluate: Callable[[Denoiser, int], dict[str, float]] | None = None
    best_metric: str | None = None
    #: networks the data path and sampling run untrained (a pipeline's text encoders and VAE): the loop places them
    frozen: list[torch.nn.Module] = dataclasses.field(default_factory=list)


def build_student(recipe: Recipe, schedule: Schedule, teacher: LoadedModel,
                  stage_outputs: dict[str, Path] | None) -> LoadedModel:
    """The student network, trainable: with the recipe's LoRA adapters and gradient checkpointing."""
    tr = recipe.train
    student = build_model(recipe.student, "student", schedule, teacher=teacher, stage_outputs=stage_outputs, seed=tr.seed)
    if student.denoiser is None or not hasattr(student.denoiser, "net"):
        raise FewstepError(f"student.kind={recipe.student.kind} is not a trainable network; valid: unet2d, mlp, pipeline, pretrained")
    net = student.denoiser.net
    net.requires_grad_(True)
    if recipe.lora is not None:
        from ..lora import inject_lora

        lo = recipe.lora
        inject_lora(net, rank=lo.rank, alpha=lo.alpha, target_modules=lo.target_modules, dropout=lo.dropout, init=lo.init,
                    seed=tr.seed)
        if lo.base_dtype is not None:  # the frozen base's storage (diffusers' LoRA scripts: weight_dtype)
            cast_frozen(net, lo.base_dtype)
    if tr.gradient_checkpointing:
        if not getattr(net, "_supports_gradient_checkpointing", False):
            raise FewstepError(f"train.gradient_checkpointing: {type(net).__name__} does not support it; set it to false")
        net.enable_gradient_checkpointing()
    return student


def optimizer_specs(recipe: Recipe, loss: DistillationLoss) -> dict[str, PhaseOptimizer]:
    """Each phase's optimizer settings: ``optimizer`` merged with ``optimizers.PHASE``, and the parameter groups
    (``optimizers.NAME`` of a network the phase trains) with their own settings."""
    specs = {}
    for phase in loss.phases:
        name, merged = split_named({**recipe.optimizer, **(recipe.optimizers.get(phase) or {})})
        cls = lookup(optimizer_classes(), name, "optimizer")
        merged = check_kwargs(cls, merged, "optimizer", skip=("params",))  # each value as torch declares it
        groups = {g: check_kwargs(cls, dict(recipe.optimizers[g]), f"optimizers.{g}", skip=("params",))
                  for g in loss.groups if g in loss.phase_modules(phase) and recipe.optimizers.get(g)}
        specs[phase] = PhaseOptimizer(name, merged, recipe.lr_scheduler.name, recipe.lr_scheduler.warmup_steps, groups)
    return specs


def build(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None, weights: bool = True) -> BuiltRun:
    """Build every object of a (validated) recipe; ``weights=False``: a pipeline teacher from its configs on the meta
    device (``--dry-run`` sizes it; nothing of such a run can train or sample)."""
    check_recipe(recipe)
    tr = recipe.train
    # --dry-run (no weights) reports a refused prompt set in a line of its own
    dataset = prompts_first(recipe, stage_outputs, run_draws(tr), RUN_DRAWS, check=weights)
    schedule, schedule_spec = schedule_from(recipe)
    teacher = build_model(recipe.teacher, "teacher", schedule, stage_outputs=stage_outputs, seed=tr.seed,
                          weights=weights)
    if teacher.pipeline is not None:
        schedule = teacher.denoiser.schedule
    student = build_student(recipe, schedule, teacher, stage_outputs)
    models = Models(teacher=teacher.denoiser, student=student.denoiser, schedule=schedule,
                    pipeline=student.pipeline or teacher.pipeline,
                    sample_shape=sample_shape(student) if student.kind != "classifier" else ())
    loss = build_loss(recipe, models, stage_outputs)
    trained = TrainedNetworks(student.denoiser, loss).bare  # the names and networks the loop will wrap
    if teacher.denoiser is not None:  # frozen but for what a trained network keeps on it (a LoRA fake score)
        freeze_teacher(teacher.denoiser, list(trained.values()))
    # after the loss: a fake score copied from the teacher starts from its float32 weights (DMD2 keeps its fake
    # UNet in float32), not from their teacher_dtype rounding
    cast_teacher(teacher, tr.teacher_dtype)
    dataset = build_data(recipe, stage_outputs) if dataset is None else dataset
    check_data(loss, recipe.loss["name"], recipe.data["name"], dataset)
    if (student.pipeline or teacher.pipeline) is not None:
        check_captions(dataset, recipe.data["name"])
    optimizers, lr_schedulers = build_optimizers(loss, trained, optimizer_specs(recipe, loss), tr.max_steps)
    settings = LoopSettings(**{f.name: getattr(tr, f.name) for f in dataclasses.fields(LoopSettings)})
    sampler = sampler_settings(recipe, loss)
    if student.pipeline is not None:
        from ..export import check_exportable

        check_exportable(student.denoiser, sampler)  # before any training: refused now, not after a day's run
    sm = recipe.sample
    sample_fn = None if student.kind == "classifier" else make_sample_fn(
        student, sampler, num=sm.num, prompts=sm.prompts, seed=tr.seed)
    evaluate = None
    if recipe.evaluation is not None and student.kind != "classifier":
        evaluate = make_evaluate(student, recipe, sampler, seed=tr.seed)
    return BuiltRun(recipe, schedule, teacher, student, loss, dataset, settings, optimizers, lr_schedulers,
                    make_prepare(student.pipeline or teacher.pipeline, table_prompts(dataset, tr.prompt_table),
                                 progress=tr.progress), sample_fn,
                    make_export(recipe, student, sampler, schedule_spec), evaluate,
                    recipe.evaluation.best if recipe.evaluation is not None else None, frozen_parts(teacher, student))


__all__ = ["BuiltRun", "DATA", "LoadedModel", "build", "build_data", "build_model", "check_pairs", "check_recipe",
           "optimizer_specs", "pairs_job"]
