"""An SD 1.x pipeline as one single-file checkpoint in the original key layout (fewstep/single_file.py), on an
SD-1.5-shaped UNet at reduced width (its four levels, two ResBlocks a level, cross-attention in the first three, the
real block structure; not the two-level tiny one): diffusers' own ``from_single_file`` (offline, ``config=`` a local
directory) reads it back to exactly the same weights."""
from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from fewstep.single_file import save_sd_single_file, sd_single_file_state
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
    path = save_sd_single_file(pipe, tmp_path / "student.safetensors")
    state = sd_single_file_state(pipe)
    assert len(state) == sum(len(m.state_dict()) for m in (pipe.unet, pipe.vae, pipe.text_encoder))
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
