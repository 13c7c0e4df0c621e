"""Procedural compositional image-caption data: one or two flat shapes on a plain or lightly textured background,
with captions whose every word can be checked from the pixels (the prompt families of GenEval, Ghosh et al. 2023:
single object, counting, colour, position, colour attribution).

Everything is generated from an index (``scene(i, split)``): unlimited, deterministic, nothing downloaded. Splits:

- ``train``: scenes whose objects never pair a colour with a shape listed in ``HELD_OUT`` (the never-seen
  combinations);
- ``seen``: the same distribution as ``train`` from a disjoint random stream (captions of seen combinations, images
  never seen);
- ``unseen``: scenes in which some object is a held-out colour-shape pair (combinations never seen in training).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import FewstepError, check_choice

SHAPES = ("circle", "square", "triangle")
#: object colours in linear [0, 1] RGB: saturated, hues 24 degrees apart or more (the scorer reads hue)
COLOURS = {"red": (0.90, 0.12, 0.10), "orange": (0.96, 0.55, 0.06), "yellow": (0.94, 0.88, 0.10),
           "green": (0.12, 0.72, 0.20), "blue": (0.14, 0.30, 0.94), "purple": (0.58, 0.16, 0.80)}
#: object side (square), diameter (circle) or base and height (triangle) in pixels at RESOLUTION
SIZES = {"small": 13.0, "large": 23.0}
#: two-object relations: the first object's offset from the second
RELATIONS = {"to the left of": (-1, 0), "to the right of": (1, 0), "above": (0, -1), "below": (0, 1)}
#: background colours: low saturation, so any object colour stands out
BACKGROUNDS = ((0.86, 0.86, 0.84), (0.70, 0.70, 0.72), (0.30, 0.30, 0.32), (0.82, 0.78, 0.70))
#: colour-shape pairs no training scene contains
HELD_OUT = (("blue", "triangle"), ("yellow", "circle"), ("red", "square"))
#: prompt kinds and their shares of the scenes
KINDS = {"single": 0.4, "count": 0.2, "pair": 0.4}
SPLITS = ("train", "seen", "unseen")
RESOLUTION = 64
NUMBERS = {1: "one", 2: "two"}
#: salts of each split's random stream (scene i of a split is drawn from its own generator)
_SALT = {"train": 0, "seen": 1_000_003, "unseen": 2_000_029}


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, size name, and its centre in pixels (x right, y down)."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    """A prompt kind ("single", "count", "pair"), its objects, the relation of a pair (first object to second),
    the background (index into BACKGROUNDS, texture amplitude) and the caption."""

    kind: str
    objects: tuple[Obj, ...]
    relation: str | None
    background: int
    texture: float
    caption: str


def _plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(kind: str, objects: tuple[Obj, ...], relation: str | None, template: int, with_size: bool) -> str:
    """The caption of a scene from one of each kind's templates (``template`` picks it)."""
    a = objects[0]
    size = f"{a.size} " if with_size else ""
    if kind == "single":
        options = [f"{_article(size or a.colour)} {size}{a.colour} {a.shape}",
                   f"one {size}{a.colour} {a.shape}",
                   f"a photo of {_article(size or a.colour)} {size}{a.colour} {a.shape}"]
    elif kind == "count":
        options = [f"two {size}{a.colour} {_plural(a.shape)}", f"a photo of two {size}{a.colour} {_plural(a.shape)}"]
    else:
        b = objects[1]
        options = [f"{_article(a.colour)} {a.colour} {a.shape} {relation} {_article(b.colour)} {b.colour} {b.shape}",
                   f"a photo of {_article(a.colour)} {a.colour} {a.shape} {relation} {_article(b.colour)} {b.colour} "
                   f"{b.shape}"]
    return options[template % len(options)]


def _draw_object(rng: np.random.Generator, held_out: bool) -> tuple[str, str]:
    """(colour, shape): one of HELD_OUT, or any pair not in it."""
    if held_out:
        return HELD_OUT[rng.integers(len(HELD_OUT))]
    while True:
        colour, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
        if (colour, shape) not in HELD_OUT:
            return colour, shape


def scene(index: int, split: str = "train", seed: int = 0) -> Scene:
    """Scene ``index`` of ``split``: deterministic in (index, split, seed)."""
    check_choice(split, SPLITS, "shapes split")
    if index < 0:
        raise FewstepError(f"scene index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, _SALT[split], index])
    kind = list(KINDS)[int(rng.choice(len(KINDS), p=list(KINDS.values())))]
    unseen = split == "unseen"
    c1, s1 = _draw_object(rng, unseen)
    size = list(SIZES)[rng.integers(len(SIZES))]
    with_size = bool(rng.integers(2))
    relation = None
    if kind == "single":
        cx, cy = rng.uniform(18, RESOLUTION - 18, size=2)
        objects = (Obj(s1, c1, size, float(cx), float(cy)),)
    elif kind == "count":
        size = "small" if rng.integers(3) else size  # two large ones leave little room to move
        horizontal = bool(rng.integers(2))
        objects = tuple(Obj(s1, c1, size, *_slot(rng, k, horizontal, size)) for k in range(2))
    else:
        while True:
            c2, s2 = _draw_object(rng, False)
            if (c2, s2) != (c1, s1):
                break
        if unseen and rng.integers(2):  # the held-out pair may be either object
            (c1, s1), (c2, s2) = (c2, s2), (c1, s1)
        relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
        dx, dy = RELATIONS[relation]
        horizontal = dx != 0
        first, second = (1, 0) if (dx > 0 or dy > 0) else (0, 1)  # slot 0 is left/top
        size = "small"
        slots = [_slot(rng, k, horizontal, size) for k in range(2)]
        objects = (Obj(s1, c1, size, *slots[first]), Obj(s2, c2, size, *slots[second]))
        with_size = False
    template = int(rng.integers(6))
    background = int(rng.integers(len(BACKGROUNDS)))
    texture = float(rng.choice([0.0, 0.04]))
    return Scene(kind, objects, relation, background, texture, caption_for(kind, objects, relation, template, with_size))


def _slot(rng: np.random.Generator, k: int, horizontal: bool, size: str) -> tuple[float, float]:
    """Centre of the k-th (0: left/top, 1: right/bottom) of two objects: in its half, jittered, at least 2 pixels
    from the middle line (two objects never touch) and 3 from the edge."""
    half = SIZES[size] / 2
    margin, middle = half + 3, RESOLUTION / 2
    along = rng.uniform(margin, middle - half - 2) if k == 0 else rng.uniform(middle + half + 2, RESOLUTION - margin)
    across = rng.uniform(margin, RESOLUTION - margin)
    return (float(along), float(across)) if horizontal else (float(across), float(along))


def shape_mask(shape: str, cx: float, cy: float, extent: float, resolution: int = RESOLUTION,
               supersample: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape (antialiased by ``supersample``^2 points per pixel), computed in
    the shape's bounding box only."""
    h = extent / 2
    out = np.zeros((resolution, resolution))
    x0, x1 = max(int(math.floor(cx - h)) - 1, 0), min(int(math.ceil(cx + h)) + 1, resolution)
    y0, y1 = max(int(math.floor(cy - h)) - 1, 0), min(int(math.ceil(cy + h)) + 1, resolution)
    if x1 <= x0 or y1 <= y0:
        return out
    x = x0 + (np.arange((x1 - x0) * supersample) + 0.5) / supersample
    y = y0 + (np.arange((y1 - y0) * supersample) + 0.5) / supersample
    x, y = np.meshgrid(x, y)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":  # upright isosceles: apex at the top, base at the bottom, base = height = extent
        top, bottom = cy - h, cy + h
        half_width = (y - top) / extent * h
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    else:
        raise FewstepError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    return out


def render(s: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as float32 RGB in [0, 1], shape (resolution, resolution, 3)."""
    scale = resolution / RESOLUTION
    img = np.empty((resolution, resolution, 3), dtype=np.float64)
    img[:] = BACKGROUNDS[s.background]
    if s.texture:  # diagonal stripes of low contrast
        yy, xx = np.mgrid[0:resolution, 0:resolution]
        img += s.texture * np.sin((xx + yy) * (2 * math.pi / (6 * scale)))[..., None]
    for o in s.objects:
        m = shape_mask(o.shape, o.cx * scale, o.cy * scale, SIZES[o.size] * scale, resolution)[..., None]
        img = img * (1 - m) + np.asarray(COLOURS[o.colour]) * m
    return np.clip(img, 0, 1).astype(np.float32)


def to_model_range(images: np.ndarray) -> Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2 - 1


#: classes of ``scene_class``: prompt kind x the first object's colour x its shape
NUM_CLASSES = len(KINDS) * len(COLOURS) * len(SHAPES)


def scene_class(s: Scene) -> int:
    """A class label for the feature network (what it learns to tell apart): the kind, and the first object's colour
    and shape."""
    o = s.objects[0]
    return (list(KINDS).index(s.kind) * len(COLOURS) + list(COLOURS).index(o.colour)) * len(SHAPES) + SHAPES.index(o.shape)


class ShapesDataset(Dataset):
    """``size`` scenes of ``split`` as {"x0": (3, R, R) in [-1, 1], "prompt": caption}, or with ``labels`` as
    {"x0", "class_labels": scene_class} (for the feature network)."""

    def __init__(self, size: int = 1_000_000, split: str = "train", resolution: int = RESOLUTION, seed: int = 0,
                 labels: bool = False) -> None:
        check_choice(split, SPLITS, "shapes split")
        if size < 1:
            raise FewstepError(f"shapes size must be at least 1, got {size}")
        self.size, self.split, self.resolution, self.seed, self.labels = size, split, resolution, seed, labels

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> Scene:
        return scene(i, self.split, self.seed)

    def __getitem__(self, i: int) -> dict:
        s = self.scene(i)
        x0 = to_model_range(render(s, self.resolution)[None])[0]
        return {"x0": x0, "class_labels": scene_class(s)} if self.labels else {"x0": x0, "prompt": s.caption}


def vocabulary() -> list[str]:
    """Every word a caption can contain (for the tokenizer)."""
    words = {"a", "an", "one", "two", "photo", "of", *(w for r in RELATIONS for w in r.split()), *COLOURS, *SIZES,
             *SHAPES, *(_plural(s) for s in SHAPES)}
    return sorted(words)
