"""Datasets by name (the recipe's ``data`` section), and what turns a batch into model inputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import Recipe, check_kwargs
from ..data.plan import ArrayDataset
from ..errors import lookup
from .resolve import resolve_stage, split_named


def digits_data(resolution: int = 8, classes: list[int] | None = None, labels: bool = True) -> ArrayDataset:
    """sklearn digits: x0 in [-1, 1] and class_labels. ``labels: false`` gives every image the null class
    (10, the index fewstep's class-conditional digits models reserve for "no label"), like a folder of
    unlabelled images: training then shapes the model's unconditional samples."""
    from ..data.digits import NUM_CLASSES, DigitsDataset

    ds = DigitsDataset(resolution, classes)
    y = ds.labels if labels else torch.full_like(ds.labels, NUM_CLASSES)
    return ArrayDataset({"x0": ds.images, "class_labels": y})


def mixture_data(mixture: str = "ring", size: int = 100_000, seed: int = 0, conditional: bool = False, **kwargs: Any) -> ArrayDataset:
    """``size`` fixed samples of the named ``mixture`` (ring, imbalanced_ring, random; plus its arguments),
    with their mode as class_labels when ``conditional``."""
    from ..data.mixtures import make_mixture

    m = make_mixture(mixture, **kwargs)
    x, k = m.sample(size, torch.Generator().manual_seed(seed), return_components=True)
    return ArrayDataset({"x0": x, "class_labels": k} if conditional else {"x0": x})


def _images(root: str, resolution: int, resize: bool = True, channels: int = 3):
    from ..data.images import ImageFolder

    return ImageFolder(root, resolution, resize=resize, channels=channels)


def _tar(shards: str, resolution: int, resize: bool = True):
    from ..data.tar_shards import TarShards

    return TarShards(shards, resolution, resize=resize)


def _hf(name: str, resolution: int, split: str = "train", image_column: str = "image", caption_column: str | None = "text",
        label_column: str | None = None, resize: bool = True):
    from ..data.hf import HFImageDataset

    return HFImageDataset(name, resolution, split=split, image_column=image_column, caption_column=caption_column,
                          label_column=label_column, resize=resize)


def _prompts(path: str | None = None):
    """One prompt a line; without a path, fewstep's 40 built-in prompts (fewstep/assets/prompts.txt)."""
    from ..data.prompts import PromptDataset

    return PromptDataset(path or Path(__file__).parents[1] / "assets" / "prompts.txt")


def _pairs(path: str):
    from ..pairs import PairsDataset

    return PairsDataset(path)


def _cache(path: str):
    from ..data.cache import CachedDataset

    return CachedDataset(path)


DATA: dict[str, Callable[..., Any]] = {
    "digits": digits_data, "mixture": mixture_data, "images": _images, "tar": _tar, "hf": _hf,
    "prompts": _prompts, "cache": _cache, "pairs": _pairs,
}


def build_data(recipe: Recipe, stage_outputs: dict[str, Path] | None = None):
    """The recipe's dataset; a ``path: stage:NAME`` names an earlier stage's pairs."""
    dname, dkw = split_named(recipe.data)
    if isinstance(dkw.get("path"), str):
        dkw["path"] = resolve_stage(dkw["path"], stage_outputs or {}, "pairs")
    return lookup(DATA, dname, "data")(**check_kwargs(DATA[dname], dkw, "data"))


def table_prompts(dataset, limit: int) -> list[str] | None:
    """The prompts a PromptTable should hold: a prompt file's, when it has at most ``limit`` distinct ones."""
    from ..data.prompts import PromptDataset

    if not isinstance(dataset, PromptDataset) or len(set(dataset.prompts)) > limit:
        return None
    return dataset.prompts


def make_prepare(pipeline, prompts: list[str] | None = None, progress: bool = False) -> Callable[[dict], dict] | None:
    """For pipeline models: prompts -> condition tensors, images -> latents. Cached data passes through. With
    ``prompts`` (a prompt file's), their conditions are encoded once (fewstep.data.prompt_table) and looked up."""
    if pipeline is None:
        return None
    encode = pipeline.encode_prompts
    if prompts is not None:
        from ..data.prompt_table import PromptTable

        encode = PromptTable(prompts, pipeline.encode_prompts, progress=progress)

    def prepare(batch: dict) -> dict:
        if "prompt" in batch:
            batch = {**batch, **encode(list(batch["prompt"]))}
        x0 = batch.get("x0")
        if isinstance(x0, Tensor) and x0.ndim == 4 and x0.shape[1] == 3:
            batch = {**batch, "x0": pipeline.encode_images(x0)}
        return batch

    return prepare
