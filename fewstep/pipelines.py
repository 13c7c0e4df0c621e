"""Real diffusers pipelines in and out: load (local path or hub id), encode prompts, VAE, save.

fewstep loads Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 and FLUX.1 through ``from_pretrained`` exactly as
users do, then hands the parts around: the denoiser network wrapped as a Denoiser, the text encoders
through the pipeline's own ``encode_prompt`` (so embeddings match diffusers bit for bit), the VAE
with its scaling and shift factors. A pipeline runs at one image size (``resolution``; FLUX.1's sampling grid shifts
with it, so its schedule is fixed for that size).
"""
from __future__ import annotations

import contextlib

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .denoisers import Cond, Denoiser, FluxDenoiser, SD3Denoiser, UNetDenoiser
from .errors import FewstepError
from .schedules import Schedule, prediction_type_from_config, schedule_from_config

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
#: families whose denoiser is ``pipe.transformer`` (the rest have ``pipe.unet``)
TRANSFORMER_FAMILIES = ("sd3", "flux")


#: hub ids removed from the Hugging Face Hub -> their maintained copies (runwayml's SD 1.5 was taken down in 2024)
MOVED_HUB_IDS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_local(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def is_hub_id(name: str) -> bool:
    """Whether ``name`` names a Hub repository (``org/name``) and not a local path: nothing exists there and it
    does not look like a path (``_looks_local``)."""
    return "/" in name and not Path(name).expanduser().exists() and not _looks_local(name)


def resolve_model(name: str) -> str:
    """Check a model path or hub id before loading; raise one clear line when it cannot be had."""
    path = Path(name).expanduser()
    if name in MOVED_HUB_IDS and not path.exists():
        raise FewstepError(f"{name} was removed from the Hugging Face Hub; its maintained copy is "
                           f"{MOVED_HUB_IDS[name]} (or pass a local directory)")
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
    #: the image side in pixels this pipeline runs at, when not its default (``teacher.resolution``)
    image_size: int | None = None
    #: built from configs on the meta device (``load_pipeline(empty=True)``): sizes only, no condition, no samples
    empty: bool = False

    def __post_init__(self) -> None:
        self.schedule = self._sized(self.schedule)

    # ------------------------------------------------------------------ parts
    @property
    def net(self) -> torch.nn.Module:
        """The denoiser network (UNet or transformer)."""
        return self.pipe.transformer if self.family in TRANSFORMER_FAMILIES else self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    def frozen_parts(self) -> list[torch.nn.Module]:
        """The networks that run without training (text encoders, VAE): every component but the denoiser network.
        Wherever the denoiser runs, these must run too (``Loop(frozen=...)`` moves them with it)."""
        return [part for part in self.pipe.components.values()
                if isinstance(part, torch.nn.Module) and part is not self.net]

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
        """Image side in pixels: ``image_size``, else the pipeline's default (the network's sample size times the VAE
        factor; FluxPipeline's ``default_sample_size`` times it, 1024 for FLUX.1)."""
        if self.image_size is not None:
            return int(self.image_size)
        if self.family == "flux":
            return int(self.pipe.default_sample_size) * self.vae_scale_factor
        return int(self.net.config.sample_size) * self.vae_scale_factor

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The latent shape (C, H, W) of one image at ``resolution``."""
        side = self.resolution // self.vae_scale_factor
        return (int(self.vae.config.latent_channels), side, side)

    @property
    def num_tokens(self) -> int:
        """FLUX.1's image sequence length at ``resolution`` (2x2 patches of the latent)."""
        _, h, w = self.sample_shape
        return (h // 2) * (w // 2)

    def _sized(self, schedule: Schedule) -> Schedule:
        """``schedule`` with a resolution-dependent shift fixed for this pipeline's size (FLUX.1's mu), on
        FluxPipeline's grid for the flux family (it hands its scheduler sigmas linspace(1, 1/n, n))."""
        if self.family == "flux" and schedule.kind == "flow" and not schedule.pipeline_sigmas:
            schedule = schedule.with_pipeline_sigmas()
        return schedule.for_sequence(self.num_tokens) if getattr(schedule, "dynamic", None) is not None else schedule

    def set_scheduler(self, scheduler) -> None:
        """Use ``scheduler`` (its schedule and prediction type become the pipeline's)."""
        self.pipe.scheduler = scheduler
        schedule, self.prediction_type = _read_scheduler(scheduler)
        self.schedule = self._sized(schedule)

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
        if self.family == "flux":  # T5's sequence and CLIP's pooled embedding (max_sequence_length 512, the default)
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def time_ids(self, n: int, resolution: int | None = None) -> Tensor:
        """SDXL micro-conditioning: (original size, crop top-left, target size), no crop."""
        r = resolution or self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device).repeat(n, 1)

    def null_cond(self) -> dict[str, Tensor] | None:
        """The unconditional condition (batch 1): the empty prompt, or zeros where SDXL forces them (None for an
        ``empty`` pipeline, whose text encoders have no weights to run)."""
        if self.empty:
            return None
        if self._null_cond is None:
            cond = self.encode_prompts([""])
            if self.family == "sdxl" and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
                cond = {k: (torch.zeros_like(v) if k != "time_ids" else v) for k, v in cond.items()}
            self._null_cond = cond
        return self._null_cond

    # ------------------------------------------------------------------ denoiser
    def denoiser(self) -> Denoiser:
        """The pipeline's network wrapped as a Denoiser, with its null condition for guidance."""
        return self.wrap(self.net, self.schedule, self.prediction_type, null_cond=self.null_cond())

    def wrap(self, net: torch.nn.Module, schedule: Schedule, prediction_type: str, *,
             null_cond: Cond | None) -> Denoiser:
        """``net`` (this pipeline's network or a copy of it) as this family's Denoiser at this pipeline's size."""
        cls = {"flux": FluxDenoiser, "sd3": SD3Denoiser}.get(self.family, UNetDenoiser)
        return cls(net, schedule, prediction_type, sample_shape=self.sample_shape, null_cond=null_cond)

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

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images clamped to [-1, 1], without gradients: what a user shows or saves."""
        return self.decode_latents(latents).clamp(-1, 1)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents -> the VAE's images, about [-1, 1] but not clamped, differentiable (LPIPS on decoded images trains
        through it); ``decode`` for images to show."""
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


def _empty_pipeline(path: str, config: dict[str, Any], class_name: str, dtype: torch.dtype, given: dict[str, Any]):
    """The pipeline with every network built from its config alone, its weights on the meta device (no memory, no
    weight files read): what ``--dry-run`` counts and sizes. Schedulers and tokenizers load as usual; ``given``
    components (None for an absent safety checker or T5) are taken as they are."""
    import importlib

    import diffusers
    from accelerate import init_empty_weights
    from diffusers import ModelMixin

    components: dict[str, Any] = dict(given)
    for name, spec in config.items():
        if name.startswith("_") or not isinstance(spec, list) or name in given:
            continue
        if spec[0] is None:
            components[name] = None
            continue
        cls = getattr(importlib.import_module(spec[0]), spec[1])
        if issubclass(cls, ModelMixin):
            with init_empty_weights():
                net = cls.from_config(cls.load_config(path, subfolder=name))
                components[name] = net if dtype == torch.float32 else net.to(dtype)
        elif issubclass(cls, torch.nn.Module):  # a transformers text encoder
            from transformers import AutoConfig

            with init_empty_weights():
                components[name] = cls._from_config(AutoConfig.from_pretrained(path, subfolder=name), dtype=dtype)
        else:  # scheduler, tokenizer
            components[name] = cls.from_pretrained(path, subfolder=name)
    return getattr(diffusers, class_name)(**components)


def load_pipeline(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  variant: str | None = None, resolution: int | None = None, empty: bool = False) -> LoadedPipeline:
    """Load an SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1 pipeline from a local directory or hub id; ``resolution`` (image
    side in pixels) when it is to run at another size than its default. ``empty``: the networks from their configs
    alone, on the meta device (sizes without weights: ``--dry-run``); such a pipeline cannot encode or sample."""
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
            if empty:
                pipe = _empty_pipeline(path, config, class_name, dtype, extra)
            else:
                pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, variant=variant, **extra)
    except OSError as e:
        raise FewstepError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    if not empty:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    local = Path(name).expanduser()
    base = str(local.resolve()) if local.exists() else name  # a hub id stays a hub id
    lp = LoadedPipeline(family, pipe, *_read_scheduler(pipe.scheduler), origin={"base": base, "base_loras": []},
                        image_size=resolution, empty=empty)
    for part in lp.frozen_parts():  # they never train (diffusers' training scripts: requires_grad_(False))
        part.requires_grad_(False)
    step = (2 if family == "flux" else 1) * lp.vae_scale_factor
    if resolution is not None and (resolution < step or resolution % step):
        raise FewstepError(f"resolution {resolution} does not fit {class_name}: it must be a positive multiple of {step} "
                           "(the VAE's factor" + (" times FLUX.1's 2x2 packing)" if family == "flux" else ")"))
    return lp


def _read_scheduler(scheduler) -> tuple[Schedule, str]:
    """fewstep's schedule and prediction type of a diffusers scheduler."""
    config = dict(scheduler.config)
    config["_class_name"] = type(scheduler).__name__
    return schedule_from_config(config), prediction_type_from_config(config)
