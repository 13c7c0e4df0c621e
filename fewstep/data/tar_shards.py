"""WebDataset-style tar shards read with the standard library (no webdataset package needed).

Files that share a key (the path without its extension) form one sample: an image
(png/jpg/jpeg/webp) and optionally a caption (txt) and/or json with "text"/"caption"/"label".
"""
from __future__ import annotations

import glob
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import FewstepError
from .images import IMAGE_EXTS, to_tensor


def expand_shards(pattern: str | list[str]) -> list[str]:
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files = sorted(f for p in patterns for f in (glob.glob(p) or ([p] if Path(p).exists() else [])))
    if not files:
        raise FewstepError(f"no tar shards match {pattern}")
    return files


class TarShards(IterableDataset):
    """Items like ImageFolder's: {"x0", "prompt"?, "class_labels"?}. Shards are split across DataLoader workers."""

    def __init__(self, shards: str | list[str], resolution: int, *, resize: bool = True) -> None:
        self.shards = expand_shards(shards)
        self.resolution, self.resize = resolution, resize

    def _samples(self, shard: str) -> Iterator[dict]:
        group: dict[str, bytes] = {}
        key = None
        try:
            tar = tarfile.open(shard)
        except (tarfile.TarError, OSError):
            raise FewstepError(f"{shard} is not a readable tar file") from None
        with tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, _, ext = m.name.rpartition(".")
                if k != key and group:
                    yield self._decode(shard, key, group)
                    group = {}
                key = k
                group[ext.lower()] = tar.extractfile(m).read()
            if group:
                yield self._decode(shard, key, group)

    def _decode(self, shard: str, key: str, group: dict[str, bytes]) -> dict:
        img_ext = next((e for e in group if "." + e in IMAGE_EXTS), None)
        if img_ext is None:
            raise FewstepError(f"{shard}: sample {key} has no image ({', '.join(IMAGE_EXTS)})")
        with Image.open(io.BytesIO(group[img_ext])) as img:
            item = {"x0": to_tensor(img, self.resolution, resize=self.resize, name=f"{shard}:{key}")}
        meta = json.loads(group["json"]) if "json" in group else {}
        text = group["txt"].decode("utf-8").strip() if "txt" in group else meta.get("text", meta.get("caption"))
        if text is not None:
            item["prompt"] = text
        if "label" in meta:
            item["class_labels"] = int(meta["label"])
        return item

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        shards = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in shards:
            yield from self._samples(shard)
