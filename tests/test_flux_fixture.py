"""The tiny FLUX.1 fixture (fewstep.testing.tiny.tiny_flux): built offline, saved, loaded back through diffusers'
FluxPipeline.from_pretrained as a user's FLUX.1 would be, and sampled by the pipeline itself; its resolution-dependent
grid is fewstep's FlowSchedule.for_sequence. (The FLUX family itself is not loaded by fewstep yet: issue 23.)"""
import torch


def test_the_tiny_flux_pipeline_round_trips_and_its_grid_is_fewsteps(tmp_path):
    from diffusers import FluxPipeline

    from fewstep.schedules import schedule_from_config
    from fewstep.testing.tiny import build_tiny_pipeline, save_tiny_pipeline

    built = build_tiny_pipeline("flux", tmp_path / "tok", seed=0)
    pipe = FluxPipeline.from_pretrained(save_tiny_pipeline("flux", tmp_path / "flux", seed=0))
    pipe.set_progress_bar_config(disable=True)
    a, b = built.transformer.state_dict(), pipe.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact through save/load
    ids = pipe.tokenizer_2("a cat", padding="max_length", max_length=8).input_ids
    assert ids[:7] == built.tokenizer_2("a cat").input_ids and ids[6] == 1 and ids[7:] == [0]  # ▁ a ▁ c a t </s> <pad>
    assert pipe.tokenizer_2.decode(ids, skip_special_tokens=True) == "a cat"
    out = pipe("a cat", num_inference_steps=3, guidance_scale=3.5, height=32, width=32, max_sequence_length=8,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    tokens = (32 // 2 // 2) ** 2  # 32 px: 16 x 16 latents (VAE factor 2), packed 2 x 2: 8 x 8 = 64 tokens
    ours = schedule_from_config(pipe.scheduler.config).for_sequence(tokens).timesteps(3)
    assert torch.allclose(ours, pipe.scheduler.timesteps.double(), atol=1e-3)  # the grid the pipeline just ran
