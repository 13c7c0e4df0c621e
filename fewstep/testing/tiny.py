"""Tiny SD-1.5-, SDXL-, SD3- and FLUX.1-shaped pipelines from configs (random weights), built offline in < 1 s.

They have the real classes and wiring of the big ones, so a recipe that runs against a tiny pipeline
saved to disk exercises the same ``from_pretrained`` path as Stable Diffusion itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import lookup
from .tokenizer import T5_PIECES, t5_tokenizer, write_clip_tokenizer

TEXT_DIM = 32
SAMPLE_SIZE = 16  # latent side; images are 32 x 32 (VAE scale factor 2)


def _tokenizer(tmp: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp), model_max_length=77)


def _text_config(tok: CLIPTokenizer, projection_dim: int = TEXT_DIM) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tok), max_position_embeddings=77, projection_dim=projection_dim, layer_norm_eps=1e-5,
    )


def _vae(**kwargs) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, **kwargs,
    )


def _sd_scheduler() -> DDIMScheduler:
    # SD 1.5's schedule; DDIM with SD's own set_alpha_to_one / steps_offset choices.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd(tmp: Path, channels: tuple[int, int] = (32, 64), sample_size: int = SAMPLE_SIZE) -> StableDiffusionPipeline:
    tok = _tokenizer(tmp / "tok")
    unet = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=2, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok, unet=unet,
        scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl(tmp: Path) -> StableDiffusionXLPipeline:
    tok = _tokenizer(tmp / "tok")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM, cross_attention_dim=2 * TEXT_DIM,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)), text_encoder_2=CLIPTextModelWithProjection(_text_config(tok)),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_sd_scheduler(), force_zeros_for_empty_prompt=True,
    )


def tiny_sd3(tmp: Path, **transformer_kwargs) -> StableDiffusion3Pipeline:
    tok = _tokenizer(tmp / "tok")
    transformer = SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=2 * TEXT_DIM,
        pooled_projection_dim=2 * TEXT_DIM, out_channels=4, **transformer_kwargs,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(_text_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tok)), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None,
    )


def tiny_sd35(tmp: Path) -> StableDiffusion3Pipeline:
    """SD 3.5-shaped: SD3's pipeline and scheduler (shift 3.0), an MMDiT with QK RMS-norm (SD 3.5 Large and Medium,
    ``qk_norm: rms_norm``) and a dual-attention first layer (SD 3.5 Medium's MMDiT-X, ``dual_attention_layers``)."""
    return tiny_sd3(tmp, qk_norm="rms_norm", dual_attention_layers=(0,))


#: FLUX.1-dev's scheduler config (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json; the hub is offline
#: here, so the values are as public trainers reproduce them, e.g. ostris/ai-toolkit's): resolution-dependent shifting
FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}


#: FLUX.1-schnell's: no shift at all (black-forest-labs/flux src/flux/cli.py samples it with ``shift=(name !=
#: "flux-schnell")``; its diffusers scheduler has use_dynamic_shifting false, shift 1)
FLUX_SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}


def tiny_flux(tmp: Path, schnell: bool = False):
    """FLUX.1 [dev]-shaped: CLIP (pooled) + T5 (sequence) text encoders, a FluxTransformer2DModel with the guidance
    embedding, 4 latent channels packed 2x2 into 16 (FLUX.1 has 16, packed into 64), the dynamic-shift scheduler.
    ``schnell``: FLUX.1 [schnell]-shaped instead (no guidance embedding, no shift)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = _tokenizer(tmp / "tok")
    t5 = T5EncoderModel(T5Config(vocab_size=len(T5_PIECES), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                         pooled_projection_dim=TEXT_DIM, guidance_embeds=not schnell,
                                         axes_dims_rope=(2, 2, 4))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(FLUX_SCHNELL_SCHEDULER if schnell else FLUX_SCHEDULER)),
        transformer=transformer,
        vae=_vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
    )


def tiny_flux_schnell(tmp: Path):
    return tiny_flux(tmp, schnell=True)


BUILDERS = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "sd35": tiny_sd35, "flux": tiny_flux,
            "flux_schnell": tiny_flux_schnell}


def build_tiny_pipeline(family: str, tmp: str | Path, seed: int = 0, **kwargs):
    """A tiny pipeline of ``family`` (sd, sdxl, sd3, sd35, flux, flux_schnell) with seeded random weights; ``tmp``
    holds its tokenizer files.
    ``kwargs`` go to the builder (sd: ``channels``, the UNet's two block widths)."""
    builder = lookup(BUILDERS, family, "pipeline family")
    torch.manual_seed(seed)
    pipe = builder(Path(tmp), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny ``family`` pipeline and save it with ``save_pretrained`` to ``path``; return the path."""
    path = Path(path)
    build_tiny_pipeline(family, path.parent / f".{path.name}-tok", seed, **kwargs).save_pretrained(path)
    return path


TINY_RESOLUTION = 2 * SAMPLE_SIZE  # image side the tiny pipelines' VAE maps to SAMPLE_SIZE latents


def save_captioned_digits(path: str | Path, num: int = 16, resolution: int = TINY_RESOLUTION) -> Path:
    """A captioned image folder of real data: sklearn digits as RGB PNGs with "a handwritten digit N" sidecars."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    for i in range(num):
        img = (d.images[i] / 16.0 * 255).astype(np.uint8)
        Image.fromarray(img).convert("RGB").resize((resolution, resolution), Image.NEAREST).save(path / f"{i:04d}.png")
        (path / f"{i:04d}.txt").write_text(f"a handwritten digit {d.target[i]}")
    return path


def save_random_lpips(path: Path, seed: int = 0) -> Path:
    """LPIPS-VGG with random weights (linear layers non-negative, as LPIPS' are) as a safetensors file: it lets
    recipes with ``distance: lpips`` run offline in tests; its numbers mean nothing."""
    from safetensors.torch import save_file

    from ..lpips import LPIPS

    path = Path(path)
    if not path.is_file():
        torch.manual_seed(seed)
        m = LPIPS()
        for lin in m.lins:
            lin.weight.data = lin.weight.data.abs()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def save_flux_dev_sized(path: str | Path) -> Path:
    """A FLUX.1 [dev]-sized pipeline directory of configs only, for ``--dry-run``: the tiny fixture with its transformer
    config replaced by FLUX.1's (FluxTransformer2DModel's defaults with the guidance embedding, as diffusers'
    scripts/convert_flux_to_diffusers.py builds FLUX.1 [dev]: 19 joint + 38 single blocks of width 3072) and its VAE's
    by FLUX.1's (SD3's 16-channel VAE config with scaling 0.3611, shift 0.1159, as that script). No transformer or VAE
    weights are written: a dry run must not need them."""
    from diffusers import FluxTransformer2DModel

    path = save_tiny_pipeline("flux", path)
    for sub in ("transformer", "vae"):
        for f in (path / sub).glob("*.safetensors"):
            f.unlink()
    with torch.device("meta"):
        config = dict(FluxTransformer2DModel(guidance_embeds=True).config)
    (path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    vae = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
           "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
    (path / "vae" / "config.json").write_text(json.dumps(vae))
    return path
