"""Datasets by name (the recipe's ``data`` section), and what turns a batch into model inputs."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import Recipe, check_kwargs
from ..data.plan import ArrayDataset
from ..errors import FewstepError, lookup
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

    m = make_mixture(mixture, **check_mixture_kwargs(mixture, kwargs))
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


def _prompts(path: str | None = None, dataset: str | None = None, split: str = "train", column: str | None = None,
             min_prompts: int = 0):
    """Captions without images: a prompt file (``path``: one prompt a line, or a .csv/.tsv/.jsonl/.json/.parquet
    file's text ``column``), or a Hugging Face ``dataset``'s text ``column``; neither: fewstep's 40 built-in prompts
    (fewstep/assets/prompts.txt). ``min_prompts``: the distinct prompts a run that draws more than that many needs
    (check_prompt_count)."""
    from ..data.prompts import PromptDataset, hf_prompts, load_prompts

    if path is not None and dataset is not None:
        raise FewstepError("data: give path (a prompt file) or dataset (a Hugging Face dataset), not both")
    if min_prompts < 0:
        raise FewstepError(f"data.min_prompts must be >= 0, got {min_prompts}")
    if dataset is not None:
        return PromptDataset(hf_prompts(dataset, split, column), min_prompts)
    return PromptDataset(load_prompts(path or Path(__file__).parents[1] / "assets" / "prompts.txt", column), min_prompts)


def check_prompt_count(dataset, draws: int, what: str) -> None:
    """Refuse a run that draws ``draws`` prompts (``what``: where that number comes from) from fewer distinct ones
    than its prompt set's ``min_prompts``, when it draws more than that many: a long run on a handful of prompts
    learns those prompts, not the teacher."""
    from ..data.prompts import PromptDataset

    if not isinstance(dataset, PromptDataset) or not dataset.min_prompts or draws <= dataset.min_prompts:
        return
    distinct = len(set(dataset.prompts))
    if distinct < dataset.min_prompts:
        raise FewstepError(
            f"{distinct:,} distinct prompts for a run that draws {draws:,} ({what}); this recipe needs at least "
            f"{dataset.min_prompts:,} (data.min_prompts): give data.path=FILE (one prompt a line, or a .csv/.jsonl/"
            f".parquet text column) or data.dataset=HUB_ID (a caption set, docs/data.md 'Prompt sets'), or draw at "
            f"most {dataset.min_prompts:,}, or set data.min_prompts=0 to train on these anyway")


def _pairs(path: str):
    from ..pairs import PairsDataset

    return PairsDataset(path)


def _shapes(split: str = "train", size: int = 1_000_000, resolution: int = 64, seed: int = 0, labels: bool = False):
    """Procedural shapes with checkable captions (fewstep.data.shapes): images rendered from their index; with
    ``labels``, class labels instead of captions (the shapes feature network's training data)."""
    from ..data.shapes import ShapesDataset

    return ShapesDataset(size, split, resolution, seed, labels)


def _cache(path: str):
    from ..data.cache import CachedDataset

    return CachedDataset(path)


DATA: dict[str, Callable[..., Any]] = {
    "digits": digits_data, "mixture": mixture_data, "images": _images, "tar": _tar, "hf": _hf,
    "prompts": _prompts, "cache": _cache, "pairs": _pairs, "shapes": _shapes,
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


#: where run_draws' number comes from, for messages
RUN_DRAWS = "train.max_steps x train.batch_size x train.grad_accum"


def run_draws(train) -> int:
    """The data items a training run draws: train.max_steps x train.batch_size x train.grad_accum."""
    return train.max_steps * train.batch_size * train.grad_accum


def prompts_first(recipe: Recipe, stage_outputs: dict[str, Path] | None, draws: int, what: str, check: bool = True):
    """A ``data: prompts`` set, built and checked against the ``draws`` of the run (check_prompt_count) before any
    model loads, so a refused prompt set costs no loading; None for other data (built where it always was)."""
    if recipe.data.get("name") != "prompts":
        return None
    dataset = build_data(recipe, stage_outputs)
    if check:
        check_prompt_count(dataset, draws, what)
    return dataset


def check_captions(dataset, data_name: str) -> None:
    """A text-to-image pipeline's data carries a caption per image: an image folder names its first uncaptioned
    image; other sources are judged by their first item (a stream's items are not looked at before training)."""
    from ..data.plan import is_stream

    captions = getattr(dataset, "captions", None)
    if captions is not None:
        missing = [f for f, c in zip(dataset.files, captions) if c is None]
        if missing:
            raise FewstepError(f"data: {len(missing)} of {len(captions)} images in {dataset.root} have no caption "
                               f"(first: {missing[0].name}) and the model is text-to-image: give each image NAME.txt "
                               "or a metadata.jsonl text field (docs/data.md), or train on data: prompts")
        return
    item = None if is_stream(dataset) or not len(dataset) else dataset[0]
    x0 = None if item is None else item.get("x0")  # an RGB image, not latents with their conditions (pairs, cache)
    if isinstance(x0, Tensor) and x0.ndim == 3 and x0.shape[0] == 3 and "prompt" not in item:
        raise FewstepError(f"data {data_name} gives images without captions and the model is text-to-image: give the "
                           "source a caption column or sidecar text (docs/data.md), or train on data: prompts")


def check_data_section(data: dict[str, Any]) -> None:
    """A recipe's ``data`` section against its source's signature, without building it; ``data: mixture``'s other
    keys against the named mixture's own arguments too."""
    name, kw = split_named(data)
    kw = check_kwargs(lookup(DATA, name, "data"), kw, "data")
    if name == "mixture":
        own = inspect.signature(mixture_data).parameters
        check_mixture_kwargs(kw.get("mixture", "ring"), {k: v for k, v in kw.items() if k not in own})


def check_mixture_kwargs(mixture: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``data: mixture``'s extra keys, checked against the named mixture's own arguments (``data.batch_size`` is
    refused with the valid keys, not passed on to fail inside it)."""
    from ..data.mixtures import MIXTURES, random_mixture

    fn = lookup({**MIXTURES, "random": random_mixture}, mixture, "data.mixture")
    own = list(inspect.signature(fn).parameters)
    unknown = [k for k in kwargs if k not in own]
    if unknown:
        shared = [n for n in inspect.signature(mixture_data).parameters if n != "kwargs"]
        valid = [f"data.{n}" for n in (*shared, *own)]
        raise FewstepError(f"unknown key data.{unknown[0]}; valid for mixture {mixture}: {', '.join(valid)}")
    return check_kwargs(fn, kwargs, "data")
