"""Teacher pairs from a recipe: the keyword arguments of fewstep.pairs.generate_pairs (teacher, conditions, grid)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Recipe
from ..data.plan import is_stream
from ..denoisers import Denoiser
from ..errors import FewstepError
from .checks import check_pairs
from .data import build_data, make_prepare, prompts_first, table_prompts
from .models import build_model, cast_teacher, frozen_parts, sample_shape
from .sample import describe
from .schedule import schedule_from


def pair_conditions(dataset, teacher: Denoiser) -> Callable[[list[int]], dict[str, Any]] | None:
    """Index i takes the condition (labels or prompt) of data item i mod len(data); None if unconditional."""
    if teacher.null_cond is None:  # an unconditional teacher
        return None
    if is_stream(dataset):
        raise FewstepError("pairs need a map-style dataset for their conditions (not a stream); use prompts, digits, images")
    n = len(dataset)
    keys = ("class_labels", "prompt", *teacher.cond_keys)
    if not any(k in dataset[0] for k in keys):
        if "encoder_hidden_states" in teacher.cond_keys:
            raise FewstepError(f"a text-conditioned teacher needs prompts for its pairs; the data gives {', '.join(dataset[0])}")
        return None  # unconditional pairs from a model that could also take labels

    def conditions(indices: list[int]) -> dict[str, Any]:
        items = [dataset[i % n] for i in indices]
        out: dict[str, Any] = {}
        for k in keys:
            if k in items[0] and k not in out:
                vals = [it[k] for it in items]
                out[k] = vals if isinstance(vals[0], str) else torch.stack([torch.as_tensor(v) for v in vals])
        return out

    return conditions


def pairs_job(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None) -> dict[str, Any]:
    """Keyword arguments for fewstep.pairs.generate_pairs from a recipe's teacher, data and pairs sections."""
    check_pairs(recipe)
    dataset = prompts_first(recipe, stage_outputs, recipe.pairs.num, "pairs.num")
    schedule, _ = schedule_from(recipe)
    teacher = build_model(recipe.teacher, "teacher", schedule, stage_outputs=stage_outputs, seed=recipe.train.seed)
    cast_teacher(teacher, recipe.train.teacher_dtype)
    dataset = build_data(recipe, stage_outputs) if dataset is None else dataset
    p = recipe.pairs
    encode = make_prepare(teacher.pipeline, table_prompts(dataset, recipe.train.prompt_table))
    if p.channels_last and hasattr(teacher.denoiser, "net"):
        teacher.denoiser.net.to(memory_format=torch.channels_last)  # this job's own teacher
    return dict(teacher=teacher.denoiser, num=p.num, shard_size=p.shard_size, batch_size=p.batch_size, solver=p.solver,
                steps=p.steps, guidance=p.guidance, spacing=p.spacing, seed=p.seed, shape=sample_shape(teacher),
                conditions=pair_conditions(dataset, teacher.denoiser), encode=encode,
                teacher_name=describe(recipe.teacher), encoder_propagation=p.encoder_propagation,
                frozen=frozen_parts(teacher))
