"""Teacher pairs for reflow (Liu et al. 2022, "Flow Straight and Fast"; InstaFlow, Liu et al. 2023).

A pair is (noise z, the teacher's ODE endpoint x1 from z, condition). Index i draws z from its own
seed, so a pair never depends on batch size, shard size, resumption or the number of processes.
Indices are grouped into shards of ``shard_size``; each shard is one safetensors file written
atomically (write beside, rename), so a shard on disk is complete. A rerun skips finished shards, and
process r of w writes shards r, r + w, r + 2w, ...: no index is written twice or left out.

Directory layout: ``manifest.json`` (the spec: count, shard size, solver, steps, guidance, seed,
sample shape, teacher) and ``pairs-000000.safetensors`` ... with tensors ``index``, ``noise``,
``x0`` (the endpoint; fewstep calls clean data x0) and label conditions, plus the prompts as JSON
in the safetensors metadata.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data.plan import ArrayDataset
from .denoisers import Denoiser
from .errors import FewstepError
from .io import save_safetensors_atomic, write_json_atomic
from .rng import sample_seed
from .solvers import make_solver, sample

MANIFEST = "manifest.json"
PAIR_SALT = 0x5041495253  # keeps pair noise apart from the training loop's per-sample seeds
SPEC_KEYS = ("num", "shard_size", "solver", "steps", "guidance", "spacing", "seed")


def shard_name(k: int) -> str:
    return f"pairs-{k:06d}.safetensors"


def pair_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> Tensor:
    """The noise of each index, from its own generator (float32, CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed + PAIR_SALT, i)))
                        for i in indices])


def _check_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    path = directory / MANIFEST
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diff = [k for k in manifest if old.get(k) != manifest[k]]
    if diff:
        raise FewstepError(f"{directory} holds pairs made with different settings (differs in {', '.join(diff)}); "
                           f"choose another directory or delete it")


def shard_ok(path: Path) -> bool:
    """A shard that exists and whose header reads (atomic writes make a torn shard unlikely; check anyway)."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {"index", "noise", "x0"} <= set(f.keys())
    except Exception:  # noqa: BLE001 — any unreadable file is regenerated
        return False


def generate_pairs(
    teacher: Denoiser,
    directory: str | Path,
    *,
    num: int,
    shard_size: int,
    batch_size: int,
    solver: str,
    steps: int,
    guidance: float | None,
    spacing: str | None,
    seed: int,
    shape: Sequence[int],
    conditions: Callable[[list[int]], dict[str, Any]] | None = None,
    encode: Callable[[dict], dict] | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    teacher_name: str | None = None,
    progress: bool = True,
    max_shards: int | None = None,
    encoder_propagation: Sequence[int] | None = None,
    frozen: Sequence[torch.nn.Module] = (),
) -> list[Path]:
    """Write this process's missing shards; returns the shards it wrote.

    ``conditions(indices)`` gives each index's condition (``class_labels`` tensor and/or ``prompt``
    list); ``encode`` turns a batch with prompts into the teacher's condition tensors.
    ``max_shards`` stops after that many new shards (for tests of resumption). ``encoder_propagation``: the key
    steps (indices into the grid) of Faster Diffusion's encoder propagation (fewstep.propagation), an approximation
    recorded in the manifest; None runs the whole UNet at every step. ``frozen``: the networks ``encode`` runs (a
    pipeline's text encoders and VAE), moved to ``device`` with the teacher.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"num": num, "shard_size": shard_size, "solver": solver, "steps": steps, "guidance": guidance,
                "spacing": spacing, "seed": seed, "shape": list(shape), "teacher": teacher_name,
                "num_shards": -(-num // shard_size), "format": 2}  # format 2: the ODE ends at sigma = 0
    if encoder_propagation is not None:  # other pairs than exact ones: a directory of exact pairs refuses them
        manifest["encoder_propagation"] = list(encoder_propagation)
    _check_manifest(directory, manifest)
    if rank == 0 and not (directory / MANIFEST).exists():
        write_json_atomic(manifest, directory / MANIFEST)
    # the ODE is solved to sigma = 0: x1 is the teacher's sample, without the 0.029 of noise SD 1.5's DDIM config
    # (set_alpha_to_one false) would leave; diffusers' DPM-Solver ends there too (final_sigmas_type "zero")
    teacher = teacher.with_schedule(teacher.schedule.with_clean_end())
    grid = teacher.schedule.sampling_grid(steps, spacing)
    if encoder_propagation is not None:
        from .propagation import EncoderPropagation, key_timesteps

        teacher = teacher.with_network(EncoderPropagation(teacher.net, key_timesteps(grid, encoder_propagation)))
    todo = [k for k in range(rank, manifest["num_shards"], world_size) if not shard_ok(directory / shard_name(k))]
    written: list[Path] = []
    teacher = teacher.to(device).eval()
    for net in frozen:
        net.eval().to(device)
    if max_shards is not None:
        todo = todo[:max_shards]
    total = sum(min((k + 1) * shard_size, num) - k * shard_size for k in todo)
    bar = tqdm(total=total, desc=f"pairs (rank {rank})", unit="pair", disable=not progress)
    for k in todo:
        indices = list(range(k * shard_size, min((k + 1) * shard_size, num)))
        parts: dict[str, list] = {}
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            z = pair_noise(seed, chunk, shape)
            cond_items = conditions(chunk) if conditions is not None else {}
            model_cond = encode(dict(cond_items)) if encode is not None and cond_items else dict(cond_items)
            model_cond = {k2: v.to(device) for k2, v in model_cond.items() if k2 in teacher.cond_keys}
            x1 = sample(teacher, make_solver(solver), z.to(device), grid, model_cond or None,
                        guidance=guidance if model_cond else None)
            for key, value in (("index", torch.tensor(chunk, dtype=torch.long)), ("noise", z), ("x0", x1.float().cpu()),
                               *cond_items.items()):
                parts.setdefault(key, []).append(value)
            bar.update(len(chunk))
        tensors = {key: torch.cat(v) for key, v in parts.items() if isinstance(v[0], Tensor)}
        prompts = [p for v in parts.get("prompt", []) for p in v]
        meta = {"prompts": json.dumps(prompts)} if prompts else None
        written.append(save_safetensors_atomic(tensors, directory / shard_name(k), metadata=meta))
    bar.close()
    return written


class PairsDataset(ArrayDataset):
    """All pairs of a finished pairs directory in memory: items ``noise``, ``x0``, conditions (and ``prompt``)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        directory = Path(path)
        if not (directory / MANIFEST).is_file():
            raise FewstepError(f"{directory} holds no pairs ({MANIFEST} missing); make them with `fewstep pairs RECIPE`")
        self.manifest = json.loads((directory / MANIFEST).read_text())
        missing = [k for k in range(self.manifest["num_shards"]) if not (directory / shard_name(k)).is_file()]
        if missing:
            raise FewstepError(f"{directory}: pairs incomplete ({len(missing)} of {self.manifest['num_shards']} shards "
                               f"missing, first {shard_name(missing[0])}); run `fewstep pairs` again to finish them")
        parts: dict[str, list[Tensor]] = {}
        self.prompts: list[str] | None = None
        for k in range(self.manifest["num_shards"]):
            with safe_open(str(directory / shard_name(k)), "pt") as f:
                for key in f.keys():
                    parts.setdefault(key, []).append(f.get_tensor(key))
                meta = f.metadata() or {}
            if "prompts" in meta:
                self.prompts = (self.prompts or []) + json.loads(meta["prompts"])
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        index = tensors.pop("index")
        if not torch.equal(index, torch.arange(self.manifest["num"])):
            raise FewstepError(f"{directory}: pair indices are not exactly 0..{self.manifest['num'] - 1} (duplicated or missing)")
        super().__init__(tensors)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        return {**item, "prompt": self.prompts[i]} if self.prompts is not None else item

    def get_batch(self, idx: list[int]) -> dict:
        batch = super().get_batch(idx)
        return {**batch, "prompt": [self.prompts[i] for i in idx]} if self.prompts is not None else batch


__all__ = ["MANIFEST", "PairsDataset", "generate_pairs", "pair_noise", "shard_name"]
