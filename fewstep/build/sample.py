"""What the student is sampled, scored and exported with: sample grids, in-training evaluation, the sampler
settings of ``fewstep.json``, and the export of final/."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import ModelSection, Recipe
from ..denoisers import Denoiser
from ..generate import cycling_conditions
from ..solvers import sample
from .models import LoadedModel, sample_shape


def make_sample_fn(model: LoadedModel, sampler: dict[str, Any], *, num: int, prompts: list[str], seed: int,
                   steps: int | None = None) -> Callable[[Denoiser], Tensor]:
    """Samples for grids: fixed noise, classes cycling 0..C-1 (or the sampler's one ``class_label``) or the
    recipe's prompts, with the model's ``sampler`` settings (fewstep.sampling); decoded for pipelines."""
    from ..sampling import sampler_grid, sampler_solver

    shape = sample_shape(model)
    lp = model.pipeline
    guidance = sampler.get("guidance")

    def fn(den: Denoiser) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        device = next(iter(den.parameters()), torch.zeros(())).device
        x = torch.randn(num, *shape, generator=g).to(device)
        cond = cycling_conditions(den, lp, num, prompts=prompts if lp is not None else None,
                                  class_label=sampler.get("class_label"), device=device)
        out = sample(den, sampler_solver(sampler, seed=seed + 1), x, sampler_grid(den.schedule, sampler, steps), cond,
                     guidance=guidance if cond is not None else None)
        if lp is not None:
            with torch.no_grad():
                out = lp.decode_latents(out)
        return out

    return fn


def sampler_settings(recipe: Recipe, loss: Any) -> dict[str, Any]:
    """The recipe's ``sample`` section plus what the loss trained under (``loss.sampler_settings``): the sampler
    written to fewstep.json and used for grids and evaluation."""
    sm = recipe.sample
    return {"solver": sm.solver, "steps": sm.steps, "guidance": sm.guidance, "spacing": sm.spacing,
            **({"class_label": sm.class_label} if sm.class_label is not None else {}), **loss.sampler_settings()}


def make_evaluate(student: LoadedModel, recipe: Recipe, sampler: dict[str, Any], *,
                  seed: int) -> Callable[[Denoiser, int], dict[str, float]]:
    """Samples from the student (fixed noise, classes cycling) scored as `fewstep eval` scores them."""
    from ..eval.evaluate import evaluate, make_extractor, reference_from

    ev, sm = recipe.evaluation, recipe.sample
    extract, _ = make_extractor(ev.features)
    reference = reference_from(ev.reference, extract)
    draw = make_sample_fn(student, sampler, num=ev.num, prompts=sm.prompts, seed=seed + 1, steps=ev.steps)

    def run(den: Denoiser, step: int) -> dict[str, float]:
        with torch.no_grad():
            images = draw(den)
            images = images.clamp(-1, 1) if images.ndim == 4 else images  # as `fewstep sample` / `eval` see them
            metrics = evaluate(images, extract, reference, with_pr=False, seed=seed)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    return run


def describe(spec: ModelSection) -> str | None:
    if spec.kind == "none":
        return None
    if spec.kind == "mixture":
        return f"analytic mixture ({spec.mixture.get('name', 'ring')})"
    return f"{spec.kind}: {spec.path}" if spec.path else spec.kind


def make_export(recipe: Recipe, student: LoadedModel, sampler: dict[str, Any],
                schedule_spec: dict[str, Any]) -> Callable[[Denoiser, Path], None]:
    """Writes the student into a directory: an ordinary diffusers pipeline (or fewstep's own format for toy
    networks) with ``fewstep.json`` (recipe, method, teacher, sampler)."""

    def export(den: Denoiser, directory: Path) -> None:
        from ..export import pipeline_scheduler, student_schedule_spec, write_final

        meta = {"recipe": recipe.name, "method": recipe.loss["name"], "teacher": describe(recipe.teacher),
                "sampler": sampler}
        if student.kind != "classifier":
            meta["sample_shape"] = list(sample_shape(student))
        if student.pipeline is not None:  # the size it trained at (FLUX.1's grid shifts with it)
            meta["resolution"] = student.pipeline.resolution
        write_final(den, directory, kind=student.kind, meta=meta, recipe_yaml=recipe.to_yaml(),
                    schedule_spec=student_schedule_spec(den, schedule_spec), pipeline=student.pipeline,
                    scheduler=pipeline_scheduler(den, student.pipeline, sampler))

    return export
