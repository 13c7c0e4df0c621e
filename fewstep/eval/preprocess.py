"""Resizing images for the FID network; implementations differ here, and so do their numbers.

- ``clean`` (clean-fid, Parmar et al. 2022): round to uint8 first, then resize each channel with
  PIL bicubic in float mode ('F'), clip to [0, 255], no rounding after.
- ``tf-legacy``: TF1 ``resize_bilinear`` with align_corners=False: source coordinate = dst * in/out
  (no half-pixel offset), on the uint8 image.
Both return float32 (N, 3, S, S) in [0, 255]; the network then sees (x - 128) / 128 (features.py).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import check_choice

MODES = ("clean", "tf-legacy")
#: how reports name each mode
DESCRIPTION = {"clean": "clean (clean-fid: PIL bicubic from uint8)",
               "tf-legacy": "tf-legacy (TF1 bilinear, align_corners false, from uint8)"}


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 (gray images repeated to RGB)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy()


def clean_resize(images: np.ndarray, size: int = 299) -> np.ndarray:
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for n, img in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(img[:, :, c].astype(np.float32), mode="F").resize((size, size), resample=Image.BICUBIC)
            out[n, c] = np.asarray(channel).clip(0, 255)
    return out


def _tf_bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = np.arange(n_out) * (n_in / n_out)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def tf_legacy_resize(images: np.ndarray, size: int = 299) -> np.ndarray:
    x = images.astype(np.float32).transpose(0, 3, 1, 2)  # N, 3, H, W
    r0, r1, wr = _tf_bilinear_weights(x.shape[2], size)
    c0, c1, wc = _tf_bilinear_weights(x.shape[3], size)
    rows = x[:, :, r0] * (1 - wr)[:, None] + x[:, :, r1] * wr[:, None]
    return rows[:, :, :, c0] * (1 - wc) + rows[:, :, :, c1] * wc


def preprocess(images: Tensor, mode: str = "clean", size: int = 299) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 3, size, size) float32 in [0, 255]."""
    check_choice(mode, MODES, "FID preprocessing")
    u8 = to_uint8(images)
    out = clean_resize(u8, size) if mode == "clean" else tf_legacy_resize(u8, size)
    return torch.from_numpy(np.ascontiguousarray(out))
