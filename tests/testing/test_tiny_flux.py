"""The tiny FLUX.1 fixture (fewstep.testing.tiny.tiny_flux): built offline, saved, loaded back through diffusers'
FluxPipeline.from_pretrained as a user's FLUX.1 would be, and sampled by the pipeline itself; its resolution-dependent
grid is fewstep's FlowSchedule.for_sequence; fewstep's own loading (load_pipeline, FluxDenoiser) samples exactly what
FluxPipeline samples."""
import pytest
import torch

from fewstep.errors import FewstepError


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


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from fewstep.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("flux") / "flux", seed=0)


def test_packing_is_fluxpipelines():
    from diffusers import FluxPipeline

    from fewstep.denoisers.flux import image_ids, pack, unpack

    x = torch.randn(2, 4, 6, 8)
    tokens = pack(x)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 4, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack(tokens, 6, 8), FluxPipeline._unpack_latents(tokens, 12, 16, 2), rtol=0, atol=0)
    torch.testing.assert_close(image_ids(6, 8, x.device, torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 3, 4, x.device, torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("guidance", [3.5, None])
def test_fewsteps_euler_over_the_tiny_flux_teacher_equals_fluxpipeline(flux_dir, guidance):
    """Same latents, same prompts: fewstep's Euler sampler on the loaded FLUX.1 [dev] (its guidance an input; None is
    FluxPipeline's default 3.5) reproduces FluxPipeline's latents, on the grid shifted for 32 px."""
    from diffusers import FluxPipeline

    from fewstep.denoisers.flux import pack
    from fewstep.pipelines import load_pipeline
    from fewstep.solvers import make_solver, sample

    lp = load_pipeline(str(flux_dir), resolution=32)
    assert lp.family == "flux" and lp.sample_shape == (4, 16, 16) and lp.num_tokens == 64
    den = lp.denoiser()
    assert den.takes_guidance and den.schedule.mu == pytest.approx(lp.schedule.mu_for(64))
    prompts = ["a photo of the cat", "the dog and the bird"]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    n = 4
    ours = sample(den, make_solver("euler"), x.clone(), lp.schedule.sampling_grid(n), lp.encode_prompts(prompts),
                  guidance=guidance)
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts, num_inference_steps=n, guidance_scale=3.5, latents=pack(x), height=32, width=32,
               output_type="latent").images
    ref = FluxPipeline._unpack_latents(ref, 32, 32, pipe.vae_scale_factor)
    assert (ours - x).abs().max() > 0.1  # the sampler moved
    torch.testing.assert_close(ours, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_flux_resolution_must_fit_the_packing(flux_dir):
    from fewstep.pipelines import load_pipeline

    with pytest.raises(FewstepError, match="resolution 30 does not fit FluxPipeline: it must be a positive multiple of 4"):
        load_pipeline(str(flux_dir), resolution=30)
    assert load_pipeline(str(flux_dir)).resolution == 256  # FluxPipeline's default_sample_size 128 x VAE factor 2


def test_flux_schnell_true_cfg_and_static_grid_equal_fluxpipeline(tmp_path):
    """FLUX.1 [schnell] has no guidance input: fewstep's guidance w is true classifier-free guidance over the empty
    prompt (FluxPipeline's true_cfg_scale with negative_prompt ""), on FluxPipeline's unshifted grid."""
    from diffusers import FluxPipeline

    from fewstep.denoisers.flux import pack
    from fewstep.pipelines import load_pipeline
    from fewstep.solvers import make_solver, sample
    from fewstep.testing.tiny import save_tiny_pipeline

    path = save_tiny_pipeline("flux_schnell", tmp_path / "schnell", seed=0)
    lp = load_pipeline(str(path), resolution=32)
    den = lp.denoiser()
    assert not den.takes_guidance and lp.schedule.dynamic is None
    n = 3
    assert lp.schedule.timesteps(n).tolist() == pytest.approx([1000.0, 2000 / 3, 1000 / 3])  # linspace(1, 1/n, n)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = sample(den, make_solver("euler"), x.clone(), lp.schedule.sampling_grid(n), lp.encode_prompts(["a cat"]),
                  guidance=2.5)
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a cat", negative_prompt="", true_cfg_scale=2.5, num_inference_steps=n, latents=pack(x), height=32,
               width=32, output_type="latent").images
    ref = FluxPipeline._unpack_latents(ref, 32, 32, pipe.vae_scale_factor)
    plain = sample(den, make_solver("euler"), x.clone(), lp.schedule.sampling_grid(n), lp.encode_prompts(["a cat"]))
    assert (ours - plain).abs().max() > 1e-3  # the guidance did something
    torch.testing.assert_close(ours, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_dry_run_of_flux_dmd_sizes_flux1_dev_from_its_configs_alone(tmp_path, captioned_dir, capsys):
    """`fewstep distill flux_dmd --dry-run` at FLUX.1 [dev]'s size (a directory of configs: no transformer weights
    exist): the transformer's 11.9B parameters (BFL: "12 billion"), built on the meta device; the full run and its
    LoRA alternatives, and the per-process FSDP rows."""
    import re

    from fewstep.cli import main
    from fewstep.testing.tiny import save_flux_dev_sized

    path = save_flux_dev_sized(tmp_path / "flux-dev")
    assert not list((path / "transformer").glob("*.safetensors"))
    rc = main(["distill", "flux_dmd", f"teacher.path={path}", f"data.root={captioned_dir}",
               f"train.output_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "run").exists()
    counts = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^ *(\w+): ([\d,]+) (?:trainable|0 trainable)", out, re.M)}
    assert counts["student"] == 11_901_408_320 and counts["fake_score"] == 11_901_408_320
    gib = {m[0].strip(): float(m[1]) for m in re.findall(r"^  (.+?) +[\d,]+ trainable +([\d.]+) GiB", out, re.M)}
    full, both = gib["this run"], gib["LoRA rank 64 student and fake score as LoRA rank 64"]
    # a float32 student and fake score with AdamW (16 bytes a parameter each) and the bfloat16 teacher: ~378 GiB
    assert full == pytest.approx((2 * 16 + 2) * 11_901_408_320 / 2**30, rel=0.01)
    assert both < 80e9 / 2**30 < full  # only the LoRA variant fits one 80 GB GPU (before activations)
    sharded = float(re.search(r"fsdp, teacher sharded +([\d.]+) GiB", out)[1])
    assert sharded == pytest.approx(full / 8, rel=0.06)  # FSDP over 8 processes: about an eighth each
