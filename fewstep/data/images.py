"""Image folders with captions or labels, and the image transform shared by every image source.

Captions come from a sidecar ``NAME.txt`` beside each image, or from ``metadata.jsonl`` lines
``{"file_name": ..., "text": ...}`` (optionally ``"label": int``), the layout of Hugging Face's imagefolder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import FewstepError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIDE_EXTS = (".txt", ".json", ".jsonl", ".csv", ".md")
MODES = ("RGB", "RGBA", "L", "P")


def to_tensor(img: Image.Image, resolution: int, *, resize: bool = True, channels: int = 3, name: str = "image") -> Tensor:
    """PIL image -> (C, R, R) float32 in [-1, 1]; resize the short side with bicubic and center-crop, or require R x R."""
    if img.mode not in MODES:
        raise FewstepError(f"{name}: unsupported image mode {img.mode}; valid: {', '.join(MODES)}")
    img = img.convert("RGB" if channels == 3 else "L")
    if resize:
        w, h = img.size
        scale = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    elif img.size != (resolution, resolution):
        raise FewstepError(f"{name}: size {img.size[0]}x{img.size[1]} but resolution {resolution}x{resolution} is required (or set resize)")
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


class ImageFolder(Dataset):
    """Items: {"x0": (C, R, R), "prompt": str (if captioned), "class_labels": int (if labelled)}.

    The folder is checked when opened: a non-image file, an unreadable image or an unsupported mode
    is an error naming the file, before any training time is spent.
    """

    def __init__(self, root: str | Path, resolution: int, *, resize: bool = True, channels: int = 3) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FewstepError(f"image folder {self.root} does not exist")
        self.resolution, self.resize, self.channels = resolution, resize, channels
        meta = self._metadata()
        self.files: list[Path] = []
        for p in sorted(q for q in self.root.rglob("*") if q.is_file() and not q.name.startswith(".")):
            if p.suffix.lower() in IMAGE_EXTS:
                self.files.append(p)
            elif p.suffix.lower() not in SIDE_EXTS:
                raise FewstepError(f"{p} is not an image; valid image types: {', '.join(IMAGE_EXTS)}")
        if not self.files:
            raise FewstepError(f"image folder {self.root} holds no images ({', '.join(IMAGE_EXTS)})")
        for p in self.files:
            try:
                with Image.open(p) as img:
                    if img.mode not in MODES:
                        raise FewstepError(f"{p}: unsupported image mode {img.mode}; valid: {', '.join(MODES)}")
                    if not resize and img.size != (resolution, resolution):
                        raise FewstepError(f"{p}: size {img.size[0]}x{img.size[1]} but {resolution}x{resolution} is required")
            except UnidentifiedImageError:
                raise FewstepError(f"{p} cannot be read as an image") from None
        self.captions = [self._caption(p, meta) for p in self.files]
        self.labels = [meta.get(p.relative_to(self.root).as_posix(), {}).get("label") for p in self.files]

    def _metadata(self) -> dict[str, dict]:
        path = self.root / "metadata.jsonl"
        if not path.exists():
            return {}
        out = {}
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[row["file_name"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FewstepError(f"{path}:{i}: each line must be a JSON object with a file_name") from None
        return out

    def _caption(self, p: Path, meta: dict[str, dict]) -> str | None:
        row = meta.get(p.relative_to(self.root).as_posix())
        if row is not None and ("text" in row or "caption" in row):
            return str(row.get("text", row.get("caption")))
        side = p.with_suffix(".txt")
        return side.read_text(encoding="utf-8").strip() if side.exists() else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.files[i]) as img:
            item = {"x0": to_tensor(img, self.resolution, resize=self.resize, channels=self.channels, name=str(self.files[i]))}
        if self.captions[i] is not None:
            item["prompt"] = self.captions[i]
        if self.labels[i] is not None:
            item["class_labels"] = int(self.labels[i])
        return item
