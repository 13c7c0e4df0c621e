"""An SD 1.x or SDXL pipeline as one single-file checkpoint in the original Stable Diffusion key layout, the file
ComfyUI and AUTOMATIC1111 load: ``model.diffusion_model.*`` (the UNet, openaimodel's layout), ``first_stage_model.*``
(the VAE) and the text encoders: SD 1.x's CLIP at ``cond_stage_model.transformer.*``; SDXL's CLIP ViT-L at
``conditioner.embedders.0.transformer.*`` and its OpenCLIP ViT-bigG at ``conditioner.embedders.1.model.*`` in
OpenCLIP's own layout (generative-models' ``FrozenOpenCLIPEmbedder2``: ``transformer.resblocks.i`` with q, k and v
stacked in ``attn.in_proj_weight``, ``mlp.c_fc``/``c_proj``, ``ln_final``, and ``text_projection`` used as x @ P,
the transpose of transformers' Linear weight).

The key correspondence is written from the two architectures (diffusers' UNet2DConditionModel and AutoencoderKL
against the CompVis ``UNetModel`` and ``AutoencoderKL``): the UNet's input blocks are ``conv_in`` then, per level,
``layers_per_block`` (ResBlock, SpatialTransformer) pairs and a Downsample; its output blocks ``layers_per_block + 1``
pairs per level with the Upsample after the last; SDXL's size and pooled-text embedding (``add_embedding``) is
``label_emb.0``; the VAE's attention projections are 1x1 convolutions there, linear layers here. diffusers' own
``from_single_file`` reads the files back (tests/test_single_file.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FewstepError

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def unet_key(key: str, config: Any) -> str:
    """A diffusers UNet2DConditionModel key -> its key in openaimodel's UNetModel (without the prefix)."""
    per = config.layers_per_block + 1
    parts = key.split(".")
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for ours, theirs in simple.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.n.0.op.*
            return f"input_blocks.{(i + 1) * per}.0.op." + ".".join(parts[5:])
        j, rest = int(parts[3]), ".".join(parts[4:])
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{1 + i * per + j}.{slot}." + (_sub(rest, RESNET) if slot == 0 else rest)
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        return f"middle_block.{slot}." + (_sub(rest, RESNET) if kind == "resnets" else rest)
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # after the level's last (ResBlock, SpatialTransformer?)
            has_attention = "CrossAttn" in config.up_block_types[i]
            return f"output_blocks.{i * per + per - 1}.{2 if has_attention else 1}." + ".".join(parts[4:])
        j, rest = int(parts[3]), ".".join(parts[4:])
        slot = 0 if kind == "resnets" else 1
        return f"output_blocks.{i * per + j}.{slot}." + (_sub(rest, RESNET) if slot == 0 else rest)
    raise FewstepError(f"no single-file key for UNet parameter {key}")


def vae_key(key: str, config: Any) -> str:
    """A diffusers AutoencoderKL key -> its key in the CompVis AutoencoderKL (without the prefix)."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, name = parts[0], parts[1]
    levels = len(config.block_out_channels)
    if name in ("conv_in", "conv_out"):
        return key
    if name == "conv_norm_out":
        return f"{side}.norm_out." + ".".join(parts[2:])
    if name in ("down_blocks", "up_blocks"):
        i, kind = int(parts[2]), parts[3]
        level = i if name == "down_blocks" else levels - 1 - i  # the decoder's up levels count from the bottom there
        where = f"{side}.{'down' if name == 'down_blocks' else 'up'}.{level}"
        if kind in ("downsamplers", "upsamplers"):
            return f"{where}.{'downsample' if kind == 'downsamplers' else 'upsample'}." + ".".join(parts[5:])
        return f"{where}.block.{parts[4]}." + _sub(".".join(parts[5:]), VAE_RESNET)
    if name == "mid_block":
        kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "attentions":
            return f"{side}.mid.attn_1." + _sub(rest, VAE_ATTENTION)
        return f"{side}.mid.block_{j + 1}." + _sub(rest, VAE_RESNET)
    raise FewstepError(f"no single-file key for VAE parameter {key}")


#: transformers' CLIP encoder layer -> OpenCLIP's residual attention block (``_sub`` table)
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
#: the text encoders' prefixes in the single file, per pipeline class
TEXT_PREFIXES = {"StableDiffusionPipeline": ("cond_stage_model.transformer.",),
                 "StableDiffusionXLPipeline": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")}


def clip_state(text_encoder) -> dict[str, Tensor]:
    """A transformers CLIPTextModel in the original layout: its keys under ``text_model.`` (transformers >= 5.6 drops
    CLIPTextModel's ``text_model.``; the single file keeps it); the position-id buffer is no weight."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")}


def open_clip_state(text_encoder) -> dict[str, Tensor]:
    """A transformers CLIPTextModelWithProjection (SDXL's text_encoder_2) in OpenCLIP's text-tower layout."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].T}
    for key, value in state.items():
        if key.startswith("encoder.layers."):
            _, _, i, rest = key.split(".", 3)
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                continue  # stacked into in_proj below
            out[f"transformer.resblocks.{i}." + _sub(rest, OPEN_CLIP_LAYER)] = value
    for i in range(text_encoder.config.num_hidden_layers):
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
    return out


def single_file_state(pipe) -> dict[str, Tensor]:
    """An SD 1.x or SDXL pipeline's UNet, VAE and text encoders in the original checkpoint's keys (tensors shared
    where the layouts agree, VAE attention projections reshaped to the 1x1 convolutions they are there)."""
    prefixes = TEXT_PREFIXES.get(type(pipe).__name__)
    if prefixes is None:
        raise FewstepError(f"a single-file checkpoint is written for {' and '.join(TEXT_PREFIXES)}; "
                           f"this is {type(pipe).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, pipe.unet.config)] = value
    for key, value in pipe.vae.state_dict().items():
        mapped = vae_key(key, pipe.vae.config)
        if ".mid.attn_1." in mapped and mapped.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear -> 1x1 Conv2d
        out["first_stage_model." + mapped] = value
    texts = [clip_state(pipe.text_encoder)]
    if len(prefixes) == 2:
        texts.append(open_clip_state(pipe.text_encoder_2))
    for prefix, state in zip(prefixes, texts):
        out.update({prefix + k: v for k, v in state.items()})
    return out


def save_single_file(pipe, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``single_file_state(pipe)`` as one safetensors file, atomically; floating tensors in ``dtype``
    (default: as they are)."""
    from .io import save_safetensors_atomic

    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
             for k, v in single_file_state(pipe).items()}
    return save_safetensors_atomic(state, Path(path))
