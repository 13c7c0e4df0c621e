"""Real diffusers pipelines in and out: load (local path or hub id), encode prompts, VAE, save.

fewstep loads Stable Diffusion 1.x/2.x, SDXL and SD3 through ``from_pretrained`` exactly as users
do, then hands the parts around: the denoiser network wrapped as a Denoiser, the text encoders
through the pipeline's own ``encode_prompt`` (so embeddings match diffusers bit for bit), the VAE
with its scaling and shift factors.
"""
from __future__ import annotations

import contextlib

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .denoisers import Cond, Denoiser, SD3Denoiser, UNetDenoiser
from .errors import FewstepError
from .schedules import Schedule, prediction_type_from_config, schedule_from_config

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_local(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_model(name: str) -> str:
    """Check a model path or hub id before loading; raise one clear line when it cannot be had."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists() and not (path / "config.json").exists():
            raise FewstepError(f"{name} is not a diffusers model directory (no model_index.json or config.json)")
        return str(path)
    if _looks_local(name):
        raise FewstepError(f"model path {name} does not exist")
    if _offline():
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, local_files_only=True)
        except Exception:
            raise FewstepError(
                f"model {name!r} is not a local directory and is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
                "forbids downloading it; pass a local path or unset HF_HUB_OFFLINE"
            ) from None
    return name


@dataclass
class LoadedPipeline:
    """A diffusers pipeline and what fewstep needs from it."""

    family: str
    pipe: Any
    schedule: Schedule
    prediction_type: str
    _null_cond: Cond | None = field(default=None, repr=False)
    #: where the weights came from: {"base": path or hub id, "base_loras": [LoRA files fused into it]}
    origin: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ parts
    @property
    def net(self) -> torch.nn.Module:
        """The denoiser network (UNet or transformer)."""
        return self.pipe.transformer if self.family == "sd3" else self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Default image side in pixels (the network's sample size times the VAE factor)."""
        return int(self.net.config.sample_size) * self.vae_scale_factor

    def set_scheduler(self, scheduler) -> None:
        """Use ``scheduler`` (its schedule and prediction type become the pipeline's)."""
        self.pipe.scheduler = scheduler
        self.schedule, self.prediction_type = _read_scheduler(scheduler)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Condition tensors for ``prompts`` via the pipeline's own encode_prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        device = self.device
        if self.family == "sd":
            embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
            return {"encoder_hidden_states": embeds}
        if self.family == "sdxl":
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self.time_ids(len(prompts))}
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def time_ids(self, n: int, resolution: int | None = None) -> Tensor:
        """SDXL micro-conditioning: (original size, crop top-left, target size), no crop."""
        r = resolution or self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device).repeat(n, 1)

    def null_cond(self) -> dict[str, Tensor]:
        """The unconditional condition (batch 1): the empty prompt, or zeros where SDXL forces them."""
        if self._null_cond is None:
            cond = self.encode_prompts([""])
            if self.family == "sdxl" and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
                cond = {k: (torch.zeros_like(v) if k != "time_ids" else v) for k, v in cond.items()}
            self._null_cond = cond
        return self._null_cond

    # ------------------------------------------------------------------ denoiser
    def denoiser(self) -> Denoiser:
        """The pipeline's network wrapped as a Denoiser, with its null condition for guidance."""
        cls = SD3Denoiser if self.family == "sd3" else UNetDenoiser
        return cls(self.net, self.schedule, self.prediction_type, null_cond=self.null_cond())

    # ------------------------------------------------------------------ VAE
    def _vae_in_dtype(self):
        """(the VAE, its compute dtype), cast once: ``ModelMixin.to`` walks every module and warns on each call, which
        an online step (encode per batch) paid every time."""
        vae, dtype = self.vae, self._vae_dtype()
        if getattr(self, "_vae_cast", None) != dtype:  # every module, once (some may have been kept in float32)
            vae.to(dtype)
            self._vae_cast = dtype
        return vae, dtype

    def _vae_dtype(self) -> torch.dtype:
        return torch.float32 if getattr(self.vae.config, "force_upcast", False) else self.vae.dtype

    @torch.no_grad()
    def encode_images(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> latents (z - shift) * scale; the posterior mean unless ``sample``."""
        vae, dtype = self._vae_in_dtype()
        dist = vae.encode(images.to(self.vae.device, dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * vae.config.scaling_factor).float()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (differentiable; wrap in no_grad when not training through it)."""
        vae, dtype = self._vae_in_dtype()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.device, dtype) / vae.config.scaling_factor + shift
        return vae.decode(z, return_dict=False)[0].float()

    # ------------------------------------------------------------------ save
    def save(self, directory: str | Path) -> Path:
        """Write the whole pipeline as a directory plain diffusers loads (safetensors)."""
        directory = Path(directory)
        self.pipe.save_pretrained(directory, safe_serialization=True)
        return directory


@contextlib.contextmanager
def _quiet_loading():
    """No per-component loading bars from diffusers/transformers (fewstep's own output stays readable)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def load_pipeline(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  variant: str | None = None) -> LoadedPipeline:
    """Load an SD 1.x/2.x, SDXL or SD3 pipeline from a local directory or hub id."""
    from diffusers import DiffusionPipeline

    path = resolve_model(name)
    try:
        config = DiffusionPipeline.load_config(path)
    except OSError as e:
        raise FewstepError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    class_name = config.get("_class_name", "")
    if class_name not in FAMILIES:
        raise FewstepError(f"unsupported pipeline {class_name!r} in {name}; valid: {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[class_name]
    extra: dict[str, Any] = {}
    if family == "sd":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    if family == "sd3":
        for key in ("text_encoder_3", "tokenizer_3"):
            if not (isinstance(config.get(key), list) and config[key][0]):
                extra[key] = None
    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, variant=variant, **extra)
    except OSError as e:
        raise FewstepError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    local = Path(name).expanduser()
    base = str(local.resolve()) if local.exists() else name  # a hub id stays a hub id
    return LoadedPipeline(family, pipe, *_read_scheduler(pipe.scheduler), origin={"base": base, "base_loras": []})


def _read_scheduler(scheduler) -> tuple[Schedule, str]:
    """fewstep's schedule and prediction type of a diffusers scheduler."""
    config = dict(scheduler.config)
    config["_class_name"] = type(scheduler).__name__
    return schedule_from_config(config), prediction_type_from_config(config)
