"""Every name and keyword of a recipe, checked without loading any model or data (so a typo in a later stage
is refused before the first one trains)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelSection, Recipe, check_kwargs
from ..errors import FewstepError, check_choice, lookup
from ..losses import loss_class
from ..schedules import SCHEDULES
from ..solvers import SOLVERS
from .data import check_data_section
from .models import network_class
from .optim import optimizer_classes, scheduler_names
from .resolve import split_named


def check_recipe(recipe: Recipe) -> None:
    """Every name and keyword in a recipe, checked without loading any model or data."""
    name, kw = split_named(recipe.schedule)
    check_kwargs(lookup(SCHEDULES, name, "schedule"), kw, "schedule")
    if not recipe.loss:
        raise FewstepError("missing section loss (with loss.name)")
    name, loss_kw = split_named(recipe.loss)
    cls = loss_class(name)
    cls.checked_settings(loss_kw)
    cls.check(**loss_kw)
    if (recipe.train.teacher_dtype == "float16" and recipe.teacher.kind not in ("none", "mixture")
            and cls.grads_through_teacher(**loss_kw)):
        raise FewstepError(
            "train.teacher_dtype float16 where a trained gradient crosses the frozen teacher (a GAN head on its features: "
            "loss.gan_weight > 0 or a divergence other than reverse_kl; or loss.fake_init teacher_lora): in float16 it "
            "underflows (benchmarks/precision.py, SD 1.5 at 512 px: the GAN gradient 100 % zeros at batch 8); use "
            "bfloat16 (DMD2's and FastGen's compute precision) or float32")
    if not recipe.data:
        raise FewstepError("missing section data (with data.name)")
    check_data_section(recipe.data)
    # the phases these settings run (overrides are applied already: one that brings in adversarial CD's
    # discriminator brings in its phase), and the networks that may train as a parameter group of a phase
    groups = cls.groups_for(**loss_kw)
    phases = (*cls.phases_for(**loss_kw), *groups)
    for phase, spec in [("default", recipe.optimizer), *recipe.optimizers.items()]:
        if phase != "default" and phase not in phases:
            raise FewstepError(f"unknown optimizers.{phase}: loss {recipe.loss['name']} has phases {', '.join(phases)} "
                               "(with these loss settings)")
        if phase in groups and "name" in (spec or {}):
            raise FewstepError(f"optimizers.{phase}.name: {phase} trains as a parameter group of another phase's "
                               "optimizer; set its lr, betas or weight_decay, not another optimizer")
        merged = {**recipe.optimizer, **(spec or {})}
        opt_name, kw = split_named(merged)
        cls_opt = lookup(optimizer_classes(), opt_name, "optimizer")
        kw = check_kwargs(cls_opt, kw, "optimizer", skip=("params",))
        _check_optimizer_values(cls_opt, kw, "optimizer" if phase == "default" else f"optimizers.{phase}",
                                recipe.lr_scheduler)
    if recipe.lr_scheduler.name not in scheduler_names():
        raise FewstepError(f"unknown lr_scheduler.name {recipe.lr_scheduler.name!r}; valid: {', '.join(scheduler_names())}")
    lookup(SOLVERS, recipe.sample.solver, "sample.solver")
    if recipe.evaluation is not None:
        from ..eval.evaluate import FEATURES

        check_choice(recipe.evaluation.features, FEATURES, "evaluation.features")
        if recipe.evaluation.num < 2:
            raise FewstepError(f"evaluation.num must be at least 2, got {recipe.evaluation.num}")
    for key, spec in (("teacher", recipe.teacher), ("student", recipe.student)):
        _check_model(spec, key)
    if recipe.student.init == "teacher" and recipe.teacher.kind in ("none", "mixture"):
        raise FewstepError(f"student.init=teacher needs a teacher network; teacher.kind is {recipe.teacher.kind}")
    for tracker in recipe.train.trackers:
        from accelerate.utils import LoggerType

        valid = [t.value for t in LoggerType if t.value != "all"]
        if tracker not in valid:
            raise FewstepError(f"unknown train.trackers entry {tracker!r}; valid: {', '.join(valid)}")
        import accelerate.utils

        available = getattr(accelerate.utils, f"is_{tracker}_available", None)
        if available is not None and not available():
            raise FewstepError(f"train.trackers: {tracker} is not installed (pip install {tracker.replace('_', '-')}), "
                               "or leave it out of train.trackers")


def _check_optimizer_values(cls: type, kwargs: dict[str, Any], key: str, schedule) -> None:
    """Values torch or diffusers would reject (``lr: -1``, ``betas: [2, 0]``): refused with the recipe, by
    building the optimizer and its LR schedule on one dummy parameter (before any stage trains)."""
    from diffusers.optimization import get_scheduler

    try:
        opt = cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise FewstepError(f"{key}: {cls.__name__} refuses {kwargs}: {str(e).splitlines()[0]}") from None
    if schedule.name not in scheduler_names():
        return  # reported by the caller with the valid names
    try:
        get_scheduler(schedule.name, opt, num_warmup_steps=schedule.warmup_steps, num_training_steps=max(1, schedule.warmup_steps + 1))
    except (ValueError, TypeError, RuntimeError) as e:
        raise FewstepError(f"lr_scheduler: {schedule.name} refuses warmup_steps={schedule.warmup_steps}: "
                           f"{str(e).splitlines()[0]}") from None


def _check_model(spec: ModelSection, key: str) -> None:
    if spec.kind in ("pipeline", "pretrained") and spec.init != "teacher" and not spec.path:
        raise FewstepError(f"{key}.kind={spec.kind} needs {key}.path (a local directory, a hub id, or stage:NAME)")
    if spec.init == "path" and not spec.path:
        raise FewstepError(f"{key}.init=path needs {key}.path")
    if spec.path and not spec.path.startswith("stage:") and spec.kind == "pretrained" and not Path(spec.path).exists():
        raise FewstepError(f"{key}.path {spec.path} does not exist")
    if spec.kind in ("unet2d", "mlp", "classifier") and spec.init == "scratch":
        check_kwargs(network_class(spec.kind), spec.config, f"{key}.config")
    if spec.kind == "mixture":
        from ..data.mixtures import make_mixture

        mix = dict(spec.mixture)
        make_mixture(mix.pop("name", "ring"), **mix)


def check_pairs(recipe: Recipe) -> None:
    """The sections pair generation reads (teacher, schedule, data, pairs), checked without loading anything."""
    _check_model(recipe.teacher, "teacher")
    if recipe.teacher.kind == "none":
        raise FewstepError("pairs need a teacher (teacher.kind is none)")
    name, kw = split_named(recipe.schedule)
    check_kwargs(lookup(SCHEDULES, name, "schedule"), kw, "schedule")
    if not recipe.data:
        raise FewstepError("missing section data (with data.name): pairs take their conditions from it")
    check_data_section(recipe.data)
    lookup(SOLVERS, recipe.pairs.solver, "pairs.solver")
