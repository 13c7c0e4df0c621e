"""Real diffusers pipelines (tiny, saved to disk) through fewstep's public loading path."""
import json

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.pipelines import load_pipeline
from fewstep.solvers import make_solver, sample
from fewstep.testing.tiny import build_tiny_pipeline

FAMILIES = ("sd", "sdxl", "sd3", "sd35")
#: the fixture -> the family fewstep loads it as (SD 3.5 is StableDiffusion3Pipeline: QK-norm, dual attention)
LOADS_AS = {"sd35": "sd3"}


def _state(pipe):
    out = {}
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            out.update({f"{name}.{k}": v for k, v in comp.state_dict().items()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(family, tiny_dirs, tmp_path):
    built = build_tiny_pipeline(family, tmp_path / "tok", seed=0)
    loaded = load_pipeline(str(tiny_dirs[family]))
    assert loaded.family == LOADS_AS.get(family, family)
    a, b = _state(built), _state(loaded.pipe)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = load_pipeline(str(loaded.save(tmp_path / "again")))
    c = _state(again.pipe)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert type(again.pipe.scheduler) is type(built.scheduler)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.pipe.scheduler.config) == public(built.scheduler.config)


@pytest.mark.parametrize("family", FAMILIES)
def test_guided_sampling_equals_the_diffusers_pipeline(family, tiny_dirs):
    """fewstep's denoiser + solver with batched CFG reproduces the pipeline's own latents
    (DDIM for SD/SDXL, flow Euler for SD3 and SD 3.5) from the same initial noise."""
    lp = load_pipeline(str(tiny_dirs[family]))
    prompts = ["a photo of the cat", "the dog and the bird"]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    n = 4
    ours = sample(lp.denoiser(), make_solver("euler" if lp.family == "sd3" else "ddim"), x.clone(),
                  lp.schedule.sampling_grid(n), lp.encode_prompts(prompts), guidance=3.0)
    ref = lp.pipe(prompts, num_inference_steps=n, guidance_scale=3.0, latents=x.clone(), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_vae_scaling_and_shift(tiny_dirs):
    lp = load_pipeline(str(tiny_dirs["sd3"]))
    vae = lp.vae
    assert vae.config.shift_factor and vae.config.scaling_factor != 1
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = (vae.encode(img).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        z = lp.encode_images(img)
        torch.testing.assert_close(z, expected)
        decoded = lp.decode_latents(z)
        torch.testing.assert_close(decoded, vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample)
    assert z.shape == (2, 4, 16, 16) and lp.resolution == 32
    # decode: the same images clamped to [-1, 1], with no graph even from latents that need grad (issue 42)
    z = (z * 40).requires_grad_(True)  # latents far out of range: the VAE's output leaves [-1, 1]
    raw, shown = lp.decode_latents(z), lp.decode(z)
    assert raw.requires_grad and not shown.requires_grad and raw.abs().max() > 1
    torch.testing.assert_close(shown, raw.detach().clamp(-1, 1))


def test_null_conditions(tiny_dirs):
    sd = load_pipeline(str(tiny_dirs["sd"]))
    torch.testing.assert_close(sd.null_cond()["encoder_hidden_states"], sd.encode_prompts([""])["encoder_hidden_states"])
    xl = load_pipeline(str(tiny_dirs["sdxl"]))
    null = xl.null_cond()
    assert not null["encoder_hidden_states"].any() and not null["text_embeds"].any()  # force_zeros_for_empty_prompt
    assert null["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    sd3 = load_pipeline(str(tiny_dirs["sd3"]))
    assert set(sd3.null_cond()) == {"encoder_hidden_states", "pooled_projections"}


def test_loading_errors(tmp_path, monkeypatch):
    with pytest.raises(FewstepError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FewstepError, match=r"'fewstep-test/no-such-model'.*HF_HUB_OFFLINE=1"):
        load_pipeline("fewstep-test/no-such-model")
    with pytest.raises(FewstepError, match="not a diffusers model directory"):
        load_pipeline(str(tmp_path))
    # SD 1.5's first hub id was removed in 2024: one line naming the maintained copy, before any download is tried
    with pytest.raises(FewstepError, match="runwayml/stable-diffusion-v1-5 was removed from the Hugging Face Hub; "
                                           "its maintained copy is stable-diffusion-v1-5/stable-diffusion-v1-5"):
        load_pipeline("runwayml/stable-diffusion-v1-5")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(FewstepError, match="valid: .*StableDiffusion3Pipeline"):
        load_pipeline(str(tmp_path))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_text_encoders_and_vae_have_no_gradients(family, tiny_dirs):
    """They never train (diffusers' training scripts freeze them the same way); the denoiser is the loop's to set."""
    lp = load_pipeline(str(tiny_dirs[family]))
    frozen = {name: part for name, part in lp.pipe.components.items()
              if isinstance(part, torch.nn.Module) and part is not lp.net}
    assert "vae" in frozen and "text_encoder" in frozen
    assert not [name for name, part in frozen.items() if any(p.requires_grad for p in part.parameters())]
    assert all(p.requires_grad for p in lp.net.parameters())
