"""One evaluation for the CLI, the benchmark and the loop: samples vs a reference -> metrics with their protocol."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import FewstepError, check_choice
from .distances import frechet_distance, kid, precision_recall
from .stats import RunningStats, load_stats

FEATURES = ("digits", "inception", "dinov2", "shapes")


def load_images(source: str | Path) -> Tensor:
    """Images in [-1, 1] (N, C, H, W) from a safetensors file (tensor ``samples``) or an image folder."""
    source = Path(source)
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not source.is_file():
            raise FewstepError(f"{source} does not exist")
        tensors = load_file(str(source))
        if "samples" not in tensors:
            raise FewstepError(f"{source} has no tensor 'samples' (found: {', '.join(tensors)})")
        return tensors["samples"].float()
    if source.is_dir():
        from PIL import Image

        from ..data.images import ImageFolder

        first = next((p for p in sorted(source.rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp")), None)
        if first is None:
            raise FewstepError(f"{source} holds no images")
        with Image.open(first) as img:
            side, channels = img.size[0], 1 if img.mode == "L" else 3
        ds = ImageFolder(source, side, resize=False, channels=channels)
        return torch.stack([ds[i]["x0"] for i in range(len(ds))])
    raise FewstepError(f"samples {source} must be a .safetensors file or an image folder")


def default_features(reference: str) -> str:
    """The feature network a reference is compared in when none is named: the embedded data's own network (digits,
    shapes), else Inception."""
    kind = reference.split(":")[0]
    return kind if kind in ("digits", "shapes") else "inception"


def make_extractor(features: str, *, inception_weights: str | None = None, preprocessing: str = "clean",
                   dinov2: str = "facebook/dinov2-large") -> tuple[Callable[[Tensor], Tensor], str]:
    """(images -> float64 features, a description of the protocol)."""
    check_choice(features, FEATURES, "features")
    if features in ("digits", "shapes"):  # the embedded data's own networks, shipped in fewstep/assets
        from .digits_net import ASSETS, digits_features, load_digits_net

        net = load_digits_net(ASSETS / f"{features}_features", f"{features}_features")
        return (lambda x: digits_features(net, x)), f"{features} feature network (fewstep/assets/{features}_features, 64-d)"
    if features == "inception":
        from .features import SCALING, inception_extractor
        from .inception import load_fid_inception
        from .preprocess import DESCRIPTION

        net = load_fid_inception(inception_weights)
        return inception_extractor(net, preprocessing), \
            (f"Inception-v3 pool3; weights: {net.source}; resize: {DESCRIPTION[preprocessing]} to 299; "
             f"input: {SCALING}")
    from .hf_features import dinov2_extractor, load_dinov2

    model, processor = load_dinov2(dinov2)
    return dinov2_extractor(model, processor), f"DINOv2 CLS ({dinov2}), its own processor"


def _features(extract: Callable[[Tensor], Tensor], images: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([extract(images[i:i + batch]) for i in range(0, len(images), batch)])


def reference_from(reference: str, extract: Callable[[Tensor], Tensor]) -> tuple[np.ndarray, np.ndarray, Tensor | None, str]:
    """(mu, sigma, features or None, description) for "digits" (or a subset, "digits:0,1,2,3,4"), an .npz file,
    a folder or a safetensors file."""
    if reference == "digits" or reference.startswith("digits:"):
        from ..data.digits import DigitsDataset

        classes = None if reference == "digits" else _classes(reference)
        data = DigitsDataset(classes=classes)
        feats = _features(extract, data.images)
        desc = f"sklearn digits ({'all' if classes is None else 'classes ' + ','.join(map(str, classes))}: {len(data)})"
    elif reference == "shapes" or reference.startswith("shapes:"):
        from ..data.shapes import ShapesDataset

        split, num = _shapes_reference(reference)
        data = ShapesDataset(num, split)
        feats = _features(extract, torch.stack([data[i]["x0"] for i in range(num)]))
        desc = f"procedural shapes ({split} split, scenes 0..{num - 1})"
    elif reference.endswith(".npz"):
        mu, sigma = load_stats(reference)
        return mu, sigma, None, f"statistics file {reference}"
    else:
        feats = _features(extract, load_images(reference))
        desc = str(reference)
    stats = RunningStats(feats.shape[1])
    stats.update(feats)
    return stats.mean, stats.cov, feats, desc


def _shapes_reference(reference: str) -> tuple[str, int]:
    """("seen", 2000) for "shapes"; "shapes:SPLIT" and "shapes:SPLIT:N" name the held-out split and the count."""
    from ..data.shapes import SPLITS

    parts = reference.split(":")[1:]
    split = parts[0] if parts else "seen"
    if split not in SPLITS or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise FewstepError(f"reference {reference!r}: expected shapes, shapes:SPLIT or shapes:SPLIT:N with SPLIT one of "
                           f"{', '.join(SPLITS)}")
    return split, int(parts[1]) if len(parts) == 2 else 2000


def _classes(reference: str) -> list[int]:
    try:
        return [int(c) for c in reference.split(":", 1)[1].split(",")]
    except ValueError:
        raise FewstepError(f"reference {reference!r}: expected digits:C,C,... with class numbers 0-9") from None


def evaluate(samples: Tensor, extract: Callable[[Tensor], Tensor], reference: tuple[np.ndarray, np.ndarray, Tensor | None, str],
             *, with_kid: bool = True, with_pr: bool = True, seed: int = 0) -> dict[str, Any]:
    """Fréchet distance always; KID and precision/recall when reference features exist."""
    mu_r, sigma_r, ref_feats, ref_desc = reference
    feats = _features(extract, samples)
    stats = RunningStats(feats.shape[1])
    stats.update(feats)
    out: dict[str, Any] = {"fd": frechet_distance(stats.mean, stats.cov, mu_r, sigma_r), "n_samples": len(samples),
                           "reference": ref_desc}
    if ref_feats is not None:
        out["n_reference"] = len(ref_feats)
        if with_kid:
            out["kid_mean"], out["kid_std"] = kid(ref_feats, feats, subsets=100, subset_size=min(1000, len(feats), len(ref_feats)), seed=seed)
        if with_pr:
            out["precision"], out["recall"] = precision_recall(ref_feats, feats)
    return out
