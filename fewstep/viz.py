"""Sample pictures without extra dependencies: image grids and 2-D scatter plots as PNG (PIL)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor


def image_grid(images: Tensor, *, columns: int | None = None, scale: int = 1) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one PIL image with a 1-pixel gap between tiles."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    n, c, h, w = x.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        tile = x[i].transpose(1, 2, 0)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = tile if c == 3 else np.repeat(tile, 3, 2)
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def scatter(points: Tensor, *, size: int = 512, extent: float = 6.0) -> Image.Image:
    """(N, 2) points in [-extent, extent]^2 drawn as dots on white."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    p = points.detach().float().cpu().numpy()[:, :2]
    uv = ((p / extent + 1) / 2 * (size - 1)).round().astype(int)
    for u, v in uv:
        if 0 <= u < size and 0 <= v < size:
            draw.point((int(u), int(size - 1 - v)), fill=(30, 60, 160))
    return img


def save_samples(samples: Tensor, path: str | Path) -> Path:
    """Images -> grid PNG; vectors -> scatter PNG of the first two coordinates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image_grid(samples, scale=4 if samples.shape[-1] <= 16 else 1) if samples.ndim == 4 else scatter(samples)
    img.save(path)
    return path
