"""Overrides that run a shipped recipe against local stand-ins: the pipeline of its family at a given path,
a captioned image folder for every stage that reads images, an LPIPS file for every stage that compares with
LPIPS. Shared by the recipe smoke tests and benchmarks/gpu_rehearsal.py."""
from __future__ import annotations

from pathlib import Path

from ..config import load_recipe

#: recipe name prefix -> pipeline family (fewstep.testing.tiny)
FAMILY = {"sd15_": "sd", "sdxl_": "sdxl", "sd3_": "sd3", "sd35_": "sd35", "flux_": "flux"}


def family_of(name: str) -> str | None:
    """The pipeline family of a shipped SD recipe (None for toy recipes)."""
    return next((f for prefix, f in FAMILY.items() if name.startswith(prefix)), None)


def standin_overrides(name: str, *, pipelines: dict[str, str | Path], images: str | Path, resolution: int,
                      lpips_weights: str | Path | None) -> list[str]:
    """``key=value`` overrides pointing recipe ``name`` (and each of its stages) at the stand-ins."""
    family = family_of(name)
    out = [f"teacher.path={pipelines[family]}"] if family else []
    recipe = load_recipe(name)
    if family and recipe.raw.get("teacher", {}).get("resolution"):  # a recipe's own size (FLUX.1 at 512) -> the tiny one
        out.append(f"teacher.resolution={resolution}")
    sections = [("", recipe.raw)] + [(f"stages.{st['name']}.", st) for st in recipe.stages]
    for prefix, section in sections:
        if family and (section.get("data") or {}).get("name") == "images":
            out += [f"{prefix}data.root={images}", f"{prefix}data.resolution={resolution}"]
        if (section.get("loss") or {}).get("distance") == "lpips" and lpips_weights is not None:
            out.append(f"{prefix}loss.lpips_weights={lpips_weights}")
    return out
