"""Image degradations a scorer must survive: the blur, noise, colour casts and compression artefacts that few-step
generators and lossy pipelines produce. Each takes float RGB in [0, 1], (H, W, 3), and a numpy Generator."""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

from ..errors import lookup


def blur(img: np.ndarray, rng: np.random.Generator, sigma: float = 1.0) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))


def noise(img: np.ndarray, rng: np.random.Generator, std: float = 0.06) -> np.ndarray:
    return np.clip(img + rng.normal(0, std, img.shape), 0, 1)


def colour_shift(img: np.ndarray, rng: np.random.Generator, gain: float = 0.15, offset: float = 0.05) -> np.ndarray:
    """A random per-channel gain in [1 - gain, 1 + gain] and offset in [-offset, offset] (a colour cast)."""
    return np.clip(img * rng.uniform(1 - gain, 1 + gain, 3) + rng.uniform(-offset, offset, 3), 0, 1)


def jpeg(img: np.ndarray, rng: np.random.Generator, quality: int = 25) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255


def low_res(img: np.ndarray, rng: np.random.Generator, factor: int = 2) -> np.ndarray:
    """Down by ``factor`` and back up (bilinear): the soft edges of a one-step sample."""
    from PIL import Image

    h, w = img.shape[:2]
    channels = [Image.fromarray(img[..., c].astype(np.float32), mode="F") for c in range(3)]
    up = [np.asarray(ch.resize((w // factor, h // factor), Image.BILINEAR).resize((w, h), Image.BILINEAR)) for ch in channels]
    return np.clip(np.stack(up, axis=2), 0, 1)


def one_step(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast pulled 30 % toward the image mean (regression to the mean), blur sigma 0.7 and noise 0.03 together."""
    mean = img.mean(axis=(0, 1), keepdims=True)
    return noise(blur(0.7 * img + 0.3 * mean, rng, 0.7), rng, 0.03)


DEGRADATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "blur": blur, "noise": noise, "colour_shift": colour_shift, "jpeg": jpeg, "low_res": low_res, "one_step": one_step}


def degrade(img: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    return lookup(DEGRADATIONS, name, "degradation")(img, rng).astype(np.float32)
