"""A run's ``final/`` to the Hugging Face Hub: the directory's files in one commit, with a model card whose metadata
header the Hub reads (base model, pipeline tag, library, license where the base's is known, tags) and the diffusers
lines that load it (huggingface_hub's ``HfApi.create_commit``; nothing else reaches the network)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import FewstepError
from .export import read_meta

#: the license each published base states on its Hub model card (its ``license``, and ``license_name`` for "other")
BASE_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("creativeml-openrail-m", None),
    "runwayml/stable-diffusion-v1-5": ("creativeml-openrail-m", None),
    "stabilityai/stable-diffusion-xl-base-1.0": ("openrail++", None),
    "stabilityai/stable-diffusion-3-medium-diffusers": ("other", "stabilityai-ai-community"),
    "stabilityai/stable-diffusion-3.5-medium": ("other", "stabilityai-ai-community"),
    "stabilityai/stable-diffusion-3.5-large": ("other", "stabilityai-ai-community"),
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license"),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None),
}
#: a Hub repository id: NAME or OWNER/NAME (letters, digits, -, _, .; at most 96 characters a part)
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def base_model(meta: dict[str, Any]) -> str | None:
    """The Hub id a student was distilled from: a LoRA's base, or the teacher's path when it is a hub id."""
    base = meta.get("base") or str(meta.get("teacher") or "").split(": ", 1)[-1]
    from .pipelines import is_hub_id

    if base and is_hub_id(base) and not base.startswith("stage:"):
        return base
    return None


def card_header(meta: dict[str, Any], pipeline_class: str | None) -> dict[str, Any]:
    """The model card's YAML metadata (https://huggingface.co/docs/hub/model-cards#model-card-metadata)."""
    base = base_model(meta)
    header: dict[str, Any] = {}
    if base:
        header["base_model"] = base
        license_, name = BASE_LICENSES.get(base, (None, None))
        if license_:
            header["license"] = license_
            if name:
                header["license_name"] = name
    header["library_name"] = "diffusers" if pipeline_class or meta["kind"] == "lora" else "fewstep"
    if pipeline_class or meta["kind"] == "lora":
        header["pipeline_tag"] = "text-to-image"
    tags = ["fewstep", "distillation", f"{meta['sampler']['steps']}-step"]
    if meta.get("method"):
        tags.append(str(meta["method"]))
    if meta["kind"] == "lora":
        tags.append("lora")
    if pipeline_class:
        tags.append(f"diffusers:{pipeline_class}")
    header["tags"] = tags
    return header


def usage(meta: dict[str, Any], repo_id: str, pipeline_class: str | None) -> str:
    """The diffusers lines that load and sample the pushed model."""
    from .export import lora_usage

    if meta["kind"] == "lora":
        return lora_usage(meta).replace("<this directory>", repo_id)
    if pipeline_class is None:
        return f"fewstep's own format: `fewstep sample --model <a local copy of {repo_id}> --num 16 --out samples.png`.\n"
    s = meta["sampler"]
    guidance = 0.0 if s.get("guidance") is None else s["guidance"]
    return f"""```python
import diffusers

pipe = diffusers.{pipeline_class}.from_pretrained("{repo_id}")
image = pipe("a photo of a cat", num_inference_steps={s['steps']}, guidance_scale={guidance}).images[0]
```
The exported scheduler ({meta.get('scheduler', 'see fewstep.json')}) is the pipeline's: keep it for {s['steps']}-step sampling.
"""


def hub_card(directory: Path, repo_id: str, meta: dict[str, Any] | None = None) -> str:
    """README.md for the Hub: the metadata header, the loading lines, then the card fewstep wrote at export
    (``meta``: the directory's fewstep.json, when the caller has read it)."""
    meta = read_meta(directory) if meta is None else meta
    index = directory / "model_index.json"
    pipeline_class = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    local = (directory / "README.md").read_text() if (directory / "README.md").is_file() else ""
    header = yaml.safe_dump(card_header(meta, pipeline_class), sort_keys=False).strip()
    return f"---\n{header}\n---\n\n## Use\n\n{usage(meta, repo_id, pipeline_class)}\n{local}"


def push(directory: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and commit every file of ``directory`` with the Hub card; the commit's URL."""
    directory = Path(directory).resolve()  # RUN/final is a link to the last stage's final/
    meta = read_meta(directory)  # a fewstep final/ directory, or one line saying it is not
    if not REPO_ID.match(repo_id):
        raise FewstepError(f"--repo-id {repo_id!r} is not a Hub repository id (NAME or OWNER/NAME: letters, digits, "
                           "-, _ and .)")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        raise FewstepError("HF_HUB_OFFLINE is set: pushing needs the network; unset it to push")
    from huggingface_hub import CommitOperationAdd, HfApi

    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "README.md")
    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=hub_card(directory, repo_id, meta).encode())]
    ops += [CommitOperationAdd(path_in_repo=p.relative_to(directory).as_posix(), path_or_fileobj=str(p)) for p in files]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.create_commit(repo_id, operations=ops, commit_message=f"fewstep: {meta.get('recipe')}",
                             repo_type="model")
    return str(getattr(info, "commit_url", info))
