"""sklearn's 1797 real 8x8 handwritten digits (UCI), as images in [-1, 1] with labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import FewstepError

NUM_CLASSES = 10


def load_digits_tensors(resolution: int = 8) -> tuple[Tensor, Tensor]:
    """(images (1797, 1, R, R) float32 in [-1, 1], labels (1797,) long). R = 8 is native; others resize bilinearly."""
    from sklearn.datasets import load_digits

    if resolution < 4:
        raise FewstepError(f"digits resolution must be at least 4, got {resolution}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


class DigitsDataset(Dataset):
    """Items: {"x0": (1, R, R), "class_labels": int}. ``classes`` keeps only those digits."""

    def __init__(self, resolution: int = 8, classes: list[int] | None = None) -> None:
        x, y = load_digits_tensors(resolution)
        if classes is not None:
            bad = sorted(set(classes) - set(range(NUM_CLASSES)))
            if bad:
                raise FewstepError(f"unknown digit class(es) {bad}; valid: 0..9")
            keep = torch.isin(y, torch.tensor(classes))
            x, y = x[keep], y[keep]
        self.images, self.labels = x, y

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"x0": self.images[i], "class_labels": self.labels[i]}
