"""Prompt adherence on the procedural shapes data (fewstep.data.shapes), scored from the pixels alone, in the manner
of GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment"): the
caption is parsed into the objects it asks for, the image into the objects it shows, and each attribute the caption
names is checked: single object present, colour, shape, size, count, position, colour attribution.

The detector is analytic and knows nothing of any generator: the background is the median of the border pixels;
foreground pixels differ from it in colour and are saturated (every background is grey or beige, every object colour
saturated); connected components of at least ``MIN_AREA`` pixels are objects; an object's colour is the palette
colour nearest in hue to its core pixels, its shape the one whose template, drawn with the object's area and
centroid, overlaps its coverage best (soft IoU), its size from its extent. An image with no object fails every
attribute its caption asks for.
"""
from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass

import numpy as np

from ..data.shapes import COLOURS, RELATIONS, SHAPES, SIZES, shape_mask
from ..errors import FewstepError

#: components smaller than this (pixels at 64 x 64; half the smallest object, a small triangle of 84.5) are specks
MIN_AREA = 40
#: positions must differ by this many pixels (at 64 x 64) along the relation's axis
POSITION_MARGIN = 3.0
#: a pixel is foreground when its RGB distance to the background and its saturation both exceed these
DISTANCE, SATURATION = 0.22, 0.25
ATTRIBUTES = ("object", "colour", "shape", "size", "count", "position", "colour_attr")
_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Wanted:
    """What a caption asks for: its kind, its objects as (colour, shape, size or None), and a pair's relation."""

    kind: str
    objects: tuple[tuple[str, str, str | None], ...]
    relation: str | None = None


@dataclass(frozen=True)
class Found:
    """A detected object: colour, shape, size, centre (x, y) in pixels at 64 x 64 and area in pixels."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    area: int


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_SIZE = "|".join(SIZES)
_REL = "|".join(RELATIONS)
_SINGLE = re.compile(rf"^(?:a photo of )?(?:an?|one) (?:({_SIZE}) )?({_COLOUR}) ({_SHAPE})$")
_COUNT = re.compile(rf"^(?:a photo of )?two (?:({_SIZE}) )?({_COLOUR}) ({_SHAPE})s$")
_PAIR = re.compile(rf"^(?:a photo of )?an? ({_COLOUR}) ({_SHAPE}) ({_REL}) an? ({_COLOUR}) ({_SHAPE})$")


def parse_caption(caption: str) -> Wanted:
    """The objects a shapes caption asks for (its three families of templates); other text is refused."""
    text = " ".join(caption.lower().split())
    if m := _SINGLE.match(text):
        return Wanted("single", ((m[2], m[3], m[1]),))
    if m := _COUNT.match(text):
        return Wanted("count", ((m[2], m[3], m[1]),) * 2)
    if m := _PAIR.match(text):
        return Wanted("pair", ((m[1], m[2], None), (m[4], m[5], None)), m[3])
    raise FewstepError(f"not a shapes caption: {caption!r}; valid: 'a [size] COLOUR SHAPE', 'two [size] COLOUR SHAPEs', "
                       f"'a COLOUR SHAPE RELATION a COLOUR SHAPE' (optionally after 'a photo of'); relations: {_REL}")


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def nearest_colour(rgb: np.ndarray) -> str:
    hue = colorsys.rgb_to_hsv(*(float(v) for v in rgb))[0]
    return min(_HUES, key=lambda name: _hue_distance(hue, _HUES[name]))


#: the fraction of its extent x extent box each shape covers
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def _shape_of(coverage: np.ndarray) -> tuple[str, float, float, float]:
    """(shape, extent, cx, cy) of one object's soft coverage map (image-sized, zero away from it), by synthesis: for
    each shape, the template of the same area and centroid is drawn as the data renders it (fewstep.data.shapes
    .shape_mask; a triangle's centroid lies extent/6 below its box's centre) and the shape whose template overlaps
    the coverage best (soft IoU, sum of minima over sum of maxima) is chosen."""
    total = coverage.sum()
    ys, xs = np.mgrid[0:coverage.shape[0], 0:coverage.shape[1]] + 0.5
    cx, cy = (coverage * xs).sum() / total, (coverage * ys).sum() / total
    best, best_iou, best_extent = SHAPES[0], -1.0, 0.0
    for shape in SHAPES:
        extent = float(np.sqrt(total / FILL[shape]))
        template = shape_mask(shape, cx, cy - (extent / 6 if shape == "triangle" else 0.0), extent,
                              resolution=coverage.shape[0], supersample=4)
        iou = np.minimum(template, coverage).sum() / np.maximum(template, coverage).sum()
        if iou > best_iou:
            best, best_iou, best_extent = shape, iou, extent
    return best, best_extent, float(cx), float(cy)


def detect(image: np.ndarray) -> list[Found]:
    """The objects in an RGB image, float in [0, 1] of shape (H, W, 3) (any square size; positions and sizes are
    reported at 64 x 64), largest first.

    Two passes: coarse components (pixels far from the background in colour and saturated), then, per component, its
    core colour (the median of its 25 % of pixels farthest from the background) and its coverage of each pixel near
    it, the projection of (pixel - background) onto (core - background), clipped to [0, 1] within one pixel of the
    component: an antialiased or blurred shape's soft mask, which ``_shape_of`` reads."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise FewstepError(f"detect takes an (H, W, 3) RGB image, got shape {img.shape}")
    scale = img.shape[0] / 64
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    offset = img - background
    distance = np.linalg.norm(offset, axis=2)
    saturation = img.max(axis=2) - img.min(axis=2)
    labels, n = ndimage.label((distance > DISTANCE) & (saturation > SATURATION))
    found = []
    for k in range(1, n + 1):
        coarse = labels == k
        if coarse.sum() < MIN_AREA * scale * scale / 2:
            continue
        far = distance[coarse]
        core = np.median(img[coarse][far >= np.quantile(far, 0.75)], axis=0)
        direction = core - background
        near = ndimage.binary_dilation(coarse, iterations=max(int(scale), 1))
        coverage = (offset @ direction) / max(float(direction @ direction), 1e-8)
        soft = np.where(near, np.clip(coverage, 0.0, 1.0), 0.0)
        if soft.sum() < MIN_AREA * scale * scale:
            continue
        shape, extent, cx, cy = _shape_of(soft)
        size = "small" if extent / scale < (SIZES["small"] + SIZES["large"]) / 2 else "large"
        found.append(Found(nearest_colour(core), shape, size, cx / scale, cy / scale,
                           int(round(soft.sum() / scale / scale))))
    return sorted(found, key=lambda f: -f.area)


def _holds(relation: str, a: Found, b: Found) -> bool:
    dx, dy = RELATIONS[relation]
    delta = (a.cx - b.cx) if dx else (a.cy - b.cy)
    return delta * (dx or dy) > POSITION_MARGIN


def score(image: np.ndarray, caption: str) -> dict[str, bool]:
    """Pass/fail of each attribute the caption asks for (a subset of ATTRIBUTES):

    - single: ``object`` (exactly one object), ``colour``, ``shape``, ``size`` (when the caption names one), each of
      the one object found;
    - count: ``count`` (exactly two objects), ``colour`` and ``shape`` (both objects have them), ``size`` if named;
    - pair: ``position`` (two objects, told apart by shape, or by colour where the shapes agree, the caption's first
      in the stated relation to its second), ``colour_attr`` (two objects whose shapes carry the caption's colours), ``shape`` (the two shapes).
    """
    want = parse_caption(caption)
    found = detect(image)
    out: dict[str, bool] = {}
    (colour, shape, size) = want.objects[0]
    if want.kind in ("single", "count"):
        n = 1 if want.kind == "single" else 2
        out["object" if n == 1 else "count"] = len(found) == n
        largest = found[:n] if len(found) >= n else []  # too few objects fail every attribute
        out["colour"] = bool(largest) and all(f.colour == colour for f in largest)
        out["shape"] = bool(largest) and all(f.shape == shape for f in largest)
        if size is not None:
            out["size"] = bool(largest) and all(f.size == size for f in largest)
        return out
    (colour2, shape2, _) = want.objects[1]
    two = found[:2] if len(found) == 2 else []
    out["shape"] = len(two) == 2 and sorted(f.shape for f in two) == sorted((shape, shape2))
    out["colour_attr"] = len(two) == 2 and any(
        (a.shape, a.colour, b.shape, b.colour) == (shape, colour, shape2, colour2) for a, b in (two, two[::-1]))
    # position, as GenEval's: the objects told apart by what distinguishes them in the caption (shape, else colour)
    key = (lambda f: f.shape) if shape != shape2 else (lambda f: f.colour)
    first, second = (shape, shape2) if shape != shape2 else (colour, colour2)
    out["position"] = len(two) == 2 and any(
        key(a) == first and key(b) == second and _holds(want.relation, a, b) for a, b in (two, two[::-1]))
    return out


def adherence(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Mean pass rate per attribute over a batch ((N, H, W, 3) in [0, 1]) and its captions, plus ``n_<attr>``,
    the number of images each rate is over, and ``overall``: the fraction of images passing every attribute."""
    if len(images) != len(captions):
        raise FewstepError(f"{len(images)} images for {len(captions)} captions")
    passed: dict[str, list[bool]] = {}
    every = []
    for image, caption in zip(images, captions):
        result = score(image, caption)
        for k, v in result.items():
            passed.setdefault(k, []).append(v)
        every.append(all(result.values()))
    out = {k: float(np.mean(passed[k])) for k in ATTRIBUTES if k in passed}
    out.update({f"n_{k}": len(passed[k]) for k in ATTRIBUTES if k in passed})
    out["overall"] = float(np.mean(every)) if every else float("nan")
    return out
