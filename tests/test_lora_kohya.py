"""A UNet LoRA in kohya's layout (fewstep/lora_kohya.py), on an SD-1.5-shaped UNet at reduced width (the real block
structure) and on the tiny SDXL: diffusers' own ``load_lora_weights`` reads it onto a fresh base, and the UNet then
computes what fewstep's adapted UNet computes, to float32 rounding (measured: max |difference| printed)."""
from __future__ import annotations

import torch

from fewstep.lora import WIDE_TARGETS, default_targets, inject_lora
from fewstep.lora_kohya import kohya_state, save_kohya_lora
from fewstep.testing.tiny import TEXT_DIM, build_tiny_pipeline
from tests.test_single_file import _sd15_shaped


def _adapted(unet, seed: int = 3) -> None:
    inject_lora(unet, rank=4, alpha=8, target_modules=default_targets(unet, WIDE_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapters an effect to compare
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _unet_out(unet, cond_kwargs: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 500]), **cond_kwargs).sample


def _check(make, family: str, cond_kwargs: dict, tmp_path, expect_prefix: str) -> float:
    pipe = make()
    base = _unet_out(pipe.unet, cond_kwargs)
    _adapted(pipe.unet)
    ours = _unet_out(pipe.unet, cond_kwargs)
    state = kohya_state(pipe.unet, family)
    assert any(k.startswith(expect_prefix) for k in state), sorted(state)[:3]
    assert all(v.item() == 8.0 for k, v in state.items() if k.endswith(".alpha"))
    path = save_kohya_lora(pipe.unet, family, tmp_path / f"{family}_kohya.safetensors")
    fresh = make()
    fresh.load_lora_weights(str(path))
    theirs = _unet_out(fresh.unet, cond_kwargs)
    diff = (theirs - ours).abs().max().item()
    print(f"{family}: kohya LoRA through diffusers' load_lora_weights, max |UNet output difference| {diff:.2e} "
          f"(the LoRA's own effect {(ours - base).abs().max().item():.2e})")
    assert (ours - base).abs().max() > 1e-2 and diff < 1e-5
    return diff


def test_an_sd15_kohya_lora_loads_in_diffusers_and_reproduces_the_adapted_unet(tmp_path):
    torch.manual_seed(0)
    enc = torch.randn(2, 77, TEXT_DIM)
    _check(lambda: _sd15_shaped(tmp_path), "sd", {"encoder_hidden_states": enc}, tmp_path,
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.")


def test_an_sdxl_kohya_lora_uses_the_original_block_names_and_loads_in_diffusers(tmp_path):
    def make():
        return build_tiny_pipeline("sdxl", tmp_path / "tok", 0)

    unet = make().unet
    torch.manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, unet.config.projection_class_embeddings_input_dim
                                                             - 6 * unet.config.addition_time_embed_dim),
                                  "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}}
    _check(make, "sdxl", cond, tmp_path, "lora_unet_input_blocks_")
