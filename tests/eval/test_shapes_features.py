"""The shapes feature network and reference (`--features shapes`, `--reference shapes[:SPLIT[:N]]`): renders sit near
the reference, blurred ones farther, blank images far; bad reference names are refused."""
from __future__ import annotations

import pytest
import torch

from fewstep.data.shapes import ShapesDataset
from fewstep.errors import FewstepError
from fewstep.eval.evaluate import default_features, evaluate, make_extractor, reference_from


def test_renders_are_near_the_reference_and_blurred_or_blank_images_far():
    extract, protocol = make_extractor("shapes")
    assert "shapes feature network" in protocol and default_features("shapes:unseen") == "shapes"
    reference = reference_from("shapes:seen:400", extract)
    data = ShapesDataset(400, "train", seed=5)
    renders = torch.stack([data[i]["x0"] for i in range(400)])
    near = evaluate(renders, extract, reference, with_kid=False, with_pr=False)["fd"]
    blurred = torch.nn.functional.avg_pool2d(renders, 5, stride=1, padding=2)
    far = evaluate(blurred, extract, reference, with_kid=False, with_pr=False)["fd"]
    blank = evaluate(torch.zeros_like(renders), extract, reference, with_kid=False, with_pr=False)["fd"]
    # measured: 110 (the bias of 400 against 400 samples in 64 dimensions), 126, 4585: the network, trained on labels
    # under input noise, weighs content far above sharpness (docs/evaluation.md)
    assert near < far and near * 10 < blank, (near, far, blank)


def test_a_bad_shapes_reference_is_refused():
    with pytest.raises(FewstepError, match="expected shapes, shapes:SPLIT or shapes:SPLIT:N"):
        reference_from("shapes:test", lambda x: x.flatten(1).double())
