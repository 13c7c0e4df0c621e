"""A cache of precomputed VAE latents and text embeddings in sharded safetensors, so that the VAE and
text encoders need not run at every training step.

Layout: ``manifest.json`` plus ``shard-00000.safetensors``... Each shard holds one tensor per key
(``x0`` = latents, condition tensors such as ``encoder_hidden_states``) and ``index`` (the dataset
indices it covers). Shards are written atomically, so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..io import save_safetensors_atomic, write_json_atomic
from .collate import collate

Encode = Callable[[dict], dict[str, Tensor]]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def build_cache(dataset: Dataset, encode: Encode, out_dir: str | Path, *, shard_size: int = 256,
                batch_size: int = 16, progress: bool = True) -> Path:
    """Encode every item of ``dataset`` with ``encode(batch) -> {key: (B, ...)}`` into shards under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    if n == 0:
        raise FewstepError("cannot cache an empty dataset")
    num_shards = (n + shard_size - 1) // shard_size
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("num_samples") != n or old.get("shard_size") != shard_size:
            raise FewstepError(f"{out} holds a cache of another dataset or shard size; choose an empty directory")
    keys: list[str] | None = None
    for s in tqdm(range(num_shards), desc="caching", disable=not progress):
        path = out / shard_name(s)
        if path.exists():
            continue
        idx = list(range(s * shard_size, min(n, (s + 1) * shard_size)))
        parts: dict[str, list[Tensor]] = {}
        for batch in DataLoader(Subset(dataset, idx), batch_size=batch_size, collate_fn=collate):
            for k, v in encode(batch).items():
                parts.setdefault(k, []).append(v.detach().cpu())
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        tensors["index"] = torch.tensor(idx, dtype=torch.long)
        save_safetensors_atomic(tensors, path)
        keys = sorted(k for k in tensors if k != "index")
    if keys is None:
        with safe_open(str(out / shard_name(0)), "pt") as f:
            keys = sorted(k for k in f.keys() if k != "index")
    write_json_atomic({"num_samples": n, "shard_size": shard_size, "num_shards": num_shards, "keys": keys}, manifest_path)
    return out


class CachedDataset(Dataset):
    """Items: {key: tensor} for each cached key (``x0`` holds the latents)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        manifest = self.dir / "manifest.json"
        if not manifest.exists():
            raise FewstepError(f"{self.dir} is not a fewstep cache (no manifest.json); build it first")
        m = json.loads(manifest.read_text())
        self.n, self.shard_size, self.keys = m["num_samples"], m["shard_size"], m["keys"]
        self._shard: tuple[int, dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return self.n

    def _load(self, s: int) -> dict[str, Tensor]:
        if self._shard is None or self._shard[0] != s:
            with safe_open(str(self.dir / shard_name(s)), "pt") as f:
                self._shard = (s, {k: f.get_tensor(k) for k in f.keys()})
        return self._shard[1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        shard = self._load(i // self.shard_size)
        j = i % self.shard_size
        return {k: shard[k][j] for k in self.keys}


def pipeline_encoder(pipeline) -> Encode:
    """``encode`` for a LoadedPipeline: images -> latents (posterior mean), prompts -> condition tensors."""

    def encode(batch: dict) -> dict[str, Tensor]:
        out = {"x0": pipeline.encode_images(batch["x0"])}
        if "prompt" in batch:
            out.update({k: v.float() for k, v in pipeline.encode_prompts(list(batch["prompt"])).items()})
        if "class_labels" in batch:
            out["class_labels"] = batch["class_labels"]
        return out

    return encode
