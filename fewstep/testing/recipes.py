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
    """``key=value`` overrides pointing recipe ``name`` (and each of its stages) at the stand-ins: among them the
    40 built-in prompts, whatever ``data.min_prompts`` a real run of the recipe asks for."""
    family = family_of(name)
    out = [f"teacher.path={pipelines[family]}"] if family else []
    recipe = load_recipe(name)
    if family and recipe.raw.get("teacher", {}).get("resolution"):  # a recipe's own size (FLUX.1 at 512) -> the tiny one
        out.append(f"teacher.resolution={resolution}")
    student = recipe.raw.get("student") or {}
    trains_pipeline = not family and student.get("kind") == "pipeline" and student.get("path")
    if trains_pipeline:  # a pipeline trained from data (shapes_teacher): the SD stand-in as its base
        out.append(f"student.path={pipelines['sd']}")
    sections = [("", recipe.raw)] + [(f"stages.{st['name']}.", st) for st in recipe.stages]
    for prefix, section in sections:
        data_name = (section.get("data") or {}).get("name")
        if family and data_name == "images":
            out.append(f"{prefix}data.root={images}")
        if (family and data_name == "images") or (trains_pipeline and data_name == "shapes"):
            out.append(f"{prefix}data.resolution={resolution}")
        if data_name == "prompts":
            out.append(f"{prefix}data.min_prompts=0")
        if (section.get("loss") or {}).get("distance") == "lpips" and lpips_weights is not None:
            out.append(f"{prefix}loss.lpips_weights={lpips_weights}")
    return out


def cpu_overrides(name: str) -> list[str]:
    """Recipe ``name`` (each stage with a batch of its own too) at batch 2 in float32: what a CPU runs it at (its
    float16 and bfloat16 kernels are slow and say nothing about a GPU's)."""
    out = ["train.batch_size=2", "pairs.batch_size=2", "train.mixed_precision=no", "train.teacher_dtype=float32"]
    return out + [f"stages.{st['name']}.train.batch_size=2" for st in load_recipe(name).stages
                  if "batch_size" in (st.get("train") or {})]
