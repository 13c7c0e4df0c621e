"""The procedural shapes data (fewstep/data/shapes.py): deterministic scenes, the held-out split's guarantee, rendering
checked against the closed-form areas of its shapes, and the tokenizer that makes each caption word one token."""
from __future__ import annotations

import numpy as np
import pytest

from fewstep.data.shapes import (COLOURS, HELD_OUT, RESOLUTION, SHAPES, SIZES, ShapesDataset, render, scene,
                                 shape_mask, vocabulary)
from fewstep.errors import FewstepError


def test_scenes_are_deterministic_and_splits_differ():
    assert scene(7, "train") == scene(7, "train")
    assert scene(7, "train") != scene(7, "seen")
    assert np.array_equal(render(scene(3, "seen")), render(scene(3, "seen")))
    with pytest.raises(FewstepError, match="valid: train, seen, unseen"):
        scene(0, "test")


def test_training_never_shows_a_held_out_pair_and_the_unseen_split_always_does():
    train = [scene(i, "train") for i in range(2000)]
    assert not any((o.colour, o.shape) in HELD_OUT for s in train for o in s.objects)
    unseen = [scene(i, "unseen") for i in range(500)]
    assert all(any((o.colour, o.shape) in HELD_OUT for o in s.objects) for s in unseen)
    kinds = {s.kind for s in train}
    assert kinds == {"single", "count", "pair"}


@pytest.mark.parametrize("shape,area", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_a_rendered_shape_covers_its_closed_form_area(shape, area):
    """Coverage summed over the pixels = the shape's area (pi d^2 / 4, d^2, d^2 / 2), to the supersampling's error."""
    d = 23.0
    m = shape_mask(shape, 31.3, 30.7, d, supersample=8)
    assert m.sum() == pytest.approx(area * d * d, rel=0.01)


def test_objects_stay_inside_the_image_and_apart():
    for i in range(500):
        s = scene(i, "train")
        for o in s.objects:
            half = SIZES[o.size] / 2
            assert half <= o.cx <= RESOLUTION - half and half <= o.cy <= RESOLUTION - half
        if len(s.objects) == 2:
            a, b = s.objects
            gap = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - SIZES[a.size] / 2 - SIZES[b.size] / 2
            assert gap >= 4 - 1e-9, (i, s)


def test_the_dataset_gives_images_in_model_range_and_their_captions():
    ds = ShapesDataset(10, "seen")
    item = ds[4]
    assert item["x0"].shape == (3, RESOLUTION, RESOLUTION)
    assert -1 <= float(item["x0"].min()) and float(item["x0"].max()) <= 1
    assert item["prompt"] == scene(4, "seen").caption


def test_every_caption_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from fewstep.testing.tokenizer import write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, vocabulary()))
    for word in vocabulary():
        assert len(tok(word).input_ids) == 3, word  # start, the word, end
    caption = scene(0, "train").caption
    assert len(tok(caption).input_ids) == len(caption.split()) + 2
    assert set(COLOURS) | set(SHAPES) <= set(vocabulary())
