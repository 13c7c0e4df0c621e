"""The shapes adherence scorer (fewstep/eval/shapes_score.py) against the data's own ground truth: every attribute
right on clean held-out renders and on the degradations a one-step generator produces, every attribute wrong where the
caption does not match the image, and "no object found" a failure."""
from __future__ import annotations

import numpy as np
import pytest

from fewstep.data.shapes import BACKGROUNDS, RELATIONS, render, scene
from fewstep.errors import FewstepError
from fewstep.eval.degrade import degrade
from fewstep.eval.shapes_score import adherence, parse_caption, score

#: held-out scenes per split in the default suite (benchmarks/shapes_scorer.py measures 2000)
N = 120


@pytest.mark.parametrize("split", ["seen", "unseen"])
def test_clean_held_out_renders_pass_every_attribute(split):
    scenes = [scene(i, split) for i in range(N)]
    result = adherence(np.stack([render(s) for s in scenes]), [s.caption for s in scenes])
    rates = {k: v for k, v in result.items() if not k.startswith("n_")}
    assert all(v == 1.0 for v in rates.values()), rates
    assert result["n_position"] > 10 and result["n_count"] > 10 and result["n_size"] > 10


@pytest.mark.parametrize("name,floor", [("blur", 0.99), ("noise", 0.99), ("one_step", 0.99), ("low_res", 0.97),
                                        ("colour_shift", 0.95)])
def test_degraded_renders_still_score(name, floor):
    """Measured at 2000 scenes a split in benchmarks/shapes_scorer.py; the floors sit below those rates."""
    rng = np.random.default_rng(0)
    scenes = [scene(i, "seen") for i in range(N)]
    images = np.stack([degrade(render(s), name, rng) for s in scenes])
    result = adherence(images, [s.caption for s in scenes])
    assert min(v for k, v in result.items() if not k.startswith("n_") and k != "overall") >= floor, result


def _swap(caption: str, a: str, b: str) -> str:
    words = caption.split()
    return " ".join(b if w == a else a if w == b else w for w in words)


def test_mismatched_captions_fail_the_attribute_they_change():
    s = next(scene(i, "seen") for i in range(100) if scene(i, "seen").kind == "single")
    o = s.objects[0]
    img = render(s)
    other_colour = "green" if o.colour != "green" else "red"
    assert score(img, s.caption.replace(o.colour, other_colour))["colour"] is False
    other_shape = "square" if o.shape != "square" else "circle"
    assert score(img, s.caption.replace(o.shape, other_shape))["shape"] is False
    pair = next(s for s in (scene(i, "seen") for i in range(200)) if s.kind == "pair"
                and s.objects[0].shape != s.objects[1].shape and s.objects[0].colour != s.objects[1].colour)
    flipped = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
               "below": "above"}[pair.relation]
    assert score(render(pair), pair.caption.replace(pair.relation, flipped))["position"] is False
    a, b = pair.objects
    assert score(render(pair), _swap(pair.caption, a.colour, b.colour))["colour_attr"] is False
    count = next(scene(i, "seen") for i in range(200) if scene(i, "seen").kind == "count")
    one = count.caption.replace("two ", "a ").replace(count.objects[0].shape + "s", count.objects[0].shape)
    assert score(render(count), one)["object"] is False


def test_an_empty_image_fails_everything_it_is_asked():
    blank = np.broadcast_to(np.asarray(BACKGROUNDS[0], dtype=np.float32), (64, 64, 3)).copy()
    for caption in ("a red circle", "two small blue squares", "a red circle above a blue square"):
        assert not any(score(blank, caption).values()), caption


def test_captions_outside_the_templates_are_refused():
    assert parse_caption("a photo of a large red circle").objects == (("red", "circle", "large"),)
    assert parse_caption("a red circle to the left of a blue square").relation == "to the left of"
    assert set(RELATIONS) == {"to the left of", "to the right of", "above", "below"}
    with pytest.raises(FewstepError, match="not a shapes caption"):
        parse_caption("a cat on a mat")
