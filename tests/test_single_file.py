"""An SD 1.x or SDXL pipeline as one single-file checkpoint in the original key layout (fewstep/single_file.py), on
SD-1.5- and SDXL-shaped networks at reduced width (the real block structure: SD 1.5's four levels with cross-attention
in the first three; SDXL's three levels with 1, 2 and 10 transformer layers, two text encoders of different widths,
the second in OpenCLIP's layout; not the two-level tiny ones): diffusers' own ``from_single_file`` (offline,
``config=`` a local directory) reads each back to exactly the same weights."""
from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from fewstep.single_file import save_single_file, single_file_state
from fewstep.testing.tiny import TEXT_DIM, build_tiny_pipeline


def _sd15_shaped(tmp_path) -> StableDiffusionPipeline:
    pipe = build_tiny_pipeline("sd", tmp_path / "tok", 0)
    torch.manual_seed(1)
    pipe.unet = UNet2DConditionModel(  # SD 1.5's config (benchmarks/gpu_rehearsal.py SD15_UNET) at 1/10 the width
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64, 128, 128],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=TEXT_DIM, attention_head_dim=8)
    return pipe


def test_the_single_file_round_trips_through_diffusers_from_single_file(tmp_path):
    pipe = _sd15_shaped(tmp_path)
    config = tmp_path / "config"
    pipe.save_pretrained(config)  # the local configs from_single_file reads instead of the Hub
    path = save_single_file(pipe, tmp_path / "student.safetensors")
    state = single_file_state(pipe)
    assert len(state) == sum(len(m.state_dict()) for m in (pipe.unet, pipe.vae)) + \
        len([k for k in pipe.text_encoder.state_dict() if not k.endswith("position_ids")])
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in state  # the first Downsample
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in state  # the UpBlock's Upsample, no attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state  # after a SpatialTransformer
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4

    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        common = set(ours) & set(theirs)
        assert common == set(ours) - {"text_model.embeddings.position_ids", "embeddings.position_ids"}, \
            (name, set(ours) ^ set(theirs))
        for key in common:
            assert torch.equal(ours[key], theirs[key]), (name, key)


def test_an_sd15_student_exports_the_single_file_with_its_ui_settings(tmp_path, tiny_dirs, captioned_dir):
    """sd15_fdistill_js's final/ holds model.safetensors (float16, the original layout) beside the diffusers folders;
    diffusers' from_single_file reads the student's weights from it, and the card names the sampler, steps and CFG
    to set. sd15_lcm's student has LCM's guidance-scale input, which the original layout has no key for: none."""
    from fewstep.cli import main
    from tests.test_recipes import smoke_args

    out = tmp_path / "run"
    assert main(smoke_args("sd15_fdistill_js", out, tiny_dirs, captioned_dir)) == 0
    final = out / "final"
    loaded = StableDiffusionPipeline.from_single_file(str(final / "model.safetensors"), config=str(final),
                                                      local_files_only=True, safety_checker=None,
                                                      requires_safety_checker=False)
    exported = StableDiffusionPipeline.from_pretrained(str(final), safety_checker=None, requires_safety_checker=False)
    for key, value in exported.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key].half(), value.half()), key
    card = (final / "README.md").read_text()
    assert "## ComfyUI and AUTOMATIC1111" in card and "Sampler: LCM" in card and "steps: 2; CFG scale: 1.0" in card  # the smoke run samples 2 steps


def _sdxl_shaped(tmp_path):
    """SDXL base's configuration at about 1/10 the width: UNet levels (320, 640, 1280) -> (32, 64, 128) with
    transformer_layers_per_block (1, 2, 10), linear projections and the text_time embedding; CLIP ViT-L (768) and
    OpenCLIP ViT-bigG (1280, projection 1280) -> widths 32 and 48, so cross_attention_dim 2048 -> 80."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fewstep.testing.tiny import _sd_scheduler, _tokenizer, _vae

    tok = _tokenizer(tmp_path / "tok")
    torch.manual_seed(2)

    def text(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=3,
                              vocab_size=len(tok), max_position_embeddings=77, projection_dim=width, layer_norm_eps=1e-5)

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 4, 8), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48, cross_attention_dim=32 + 48)
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(text(32)),
                                     text_encoder_2=CLIPTextModelWithProjection(text(48)), tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=_sd_scheduler())


def test_an_sdxl_single_file_round_trips_through_diffusers_from_single_file(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = _sdxl_shaped(tmp_path)
    config = tmp_path / "config"
    pipe.save_pretrained(config)
    state = single_file_state(pipe)
    assert "model.diffusion_model.label_emb.0.0.weight" in state  # the size and pooled-text embedding
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in state  # 10 layers deep
    assert state["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert torch.equal(state["conditioner.embedders.1.model.text_projection"],
                       pipe.text_encoder_2.text_projection.weight.T)
    path = save_single_file(pipe, tmp_path / "student.safetensors")
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        keys = {k for k in ours if not k.endswith("position_ids")}
        assert keys <= set(theirs), (name, keys - set(theirs))
        for key in keys:
            assert torch.equal(ours[key], theirs[key]), (name, key)


def test_an_sdxl_student_exports_the_single_file_with_its_starting_sigma(tmp_path, tiny_dirs, captioned_dir):
    """sdxl_fdistill_js (DMD2 SDXL: one step at timestep 399) writes model.safetensors with both text encoders in the
    original layout, and its card gives the sigma a UI must start at: sqrt(1 - abar_399) / sqrt(abar_399) from the
    exported scheduler's own alphas_cumprod."""
    from diffusers import DDPMScheduler
    from safetensors import safe_open

    from fewstep.cli import main
    from tests.test_recipes import smoke_args

    out = tmp_path / "run"
    assert main(smoke_args("sdxl_fdistill_js", out, tiny_dirs, captioned_dir)) == 0
    final = out / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    abar = DDPMScheduler.from_pretrained(str(final), subfolder="scheduler").alphas_cumprod.double()[399]
    card = (final / "README.md").read_text()
    assert f"sigmas [{((1 - abar) / abar).sqrt().item():.4f}, 0]" in card, card
