"""The recipe's loss, built through its one entry point, ``Loss.from_models(models, **settings)``."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Recipe, check_kwargs
from ..errors import FewstepError
from ..losses import loss_class
from ..losses.base import DistillationLoss, Models
from .resolve import resolve_stage, split_named


def resolve_checkpoint(value: str, stage_outputs: dict[str, Path]) -> str:
    """``stage:NAME`` -> the newest intact checkpoint of that earlier stage (a path passes through)."""
    if not value.startswith("stage:"):
        return value
    from ..checkpoint import latest_intact

    ckpt = latest_intact(Path(resolve_stage(value, stage_outputs, "checkpoints")), report=lambda m: None)
    if ckpt is None:
        raise FewstepError(f"{value} has no intact checkpoint")
    return str(ckpt)


def build_loss(recipe: Recipe, models: Models, stage_outputs: dict[str, Path] | None = None) -> DistillationLoss:
    """The loss of ``recipe.loss`` over ``models``; ``fake_from: stage:NAME`` names that stage's checkpoint.

    The networks a loss creates (discriminators, a fake score from scratch, sCM's weighting) draw their initial
    weights from ``train.seed`` under a forked RNG, not from whatever the global generator holds by then: that state
    differs between a 1-process and a 2-process launch of the same pipeline run, and so did the discriminator."""
    name, settings = split_named(recipe.loss)
    cls = loss_class(name)
    settings = check_kwargs(cls, settings, "loss", skip=cls.provided)
    if isinstance(settings.get("fake_from"), str):
        try:
            settings["fake_from"] = resolve_checkpoint(settings["fake_from"], stage_outputs or {})
        except FewstepError as e:
            raise FewstepError(f"loss.fake_from: {e}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        return cls.from_models(models, **settings)


def check_data(loss: DistillationLoss, loss_name: str, data_name: str, dataset) -> None:
    """The data gives what the loss needs (``loss.needs``; a stream's items are not looked at before training)."""
    from ..data.plan import is_stream

    why = loss.needs.get("x0")
    if why is not None and not is_stream(dataset) and "x0" not in dataset[0]:
        raise FewstepError(f"loss {loss_name} needs data with x0 (images, latents or vectors){why}; data {data_name} "
                           f"gives {', '.join(dataset[0])}")
