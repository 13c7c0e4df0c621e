"""Export (fewstep.export): final/ loads back into the same function, and its diffusers scheduler is the
training schedule as diffusers computes it."""
import json

import pytest
import torch

from fewstep.build import build
from fewstep.config import validate
from fewstep.errors import FewstepError
from fewstep.export import check_exportable, diffusers_scheduler, load_final
from fewstep.schedules import VPSchedule
from tests.test_loop import mlp_recipe


def test_a_toy_student_loads_back_bit_exact_with_its_metadata(tmp_path):
    b = build(validate(mlp_recipe(tmp_path / "run")))
    den = b.student.denoiser
    b.export(den, tmp_path / "final")
    loaded, meta, _ = load_final(tmp_path / "final")
    x, t = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.linspace(10, 990, 6).double()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), den(x, t))
    saved = json.loads((tmp_path / "final" / "fewstep.json").read_text())
    assert saved["method"] == meta["method"] == "diffusion" and saved["sample_shape"] == [2]
    assert saved["sampler"]["solver"] == b.recipe.sample.solver and saved["sampler"]["steps"] == b.recipe.sample.steps


def test_the_exported_vp_scheduler_has_the_training_schedules_alphas():
    """diffusers' DDIMScheduler built from the spec computes the same alpha-bar as fewstep's VPSchedule."""
    spec = {"name": "vp", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ours = VPSchedule.from_betas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    theirs = diffusers_scheduler(spec, "epsilon")
    assert theirs.config.prediction_type == "epsilon"
    alpha, _ = ours.alpha_sigma(torch.arange(1000).double())
    assert torch.allclose(alpha.double() ** 2, theirs.alphas_cumprod.double(), atol=1e-6)


def test_a_consistency_sampler_lcmscheduler_cannot_run_is_refused():
    den = type("S", (), {"schedule": VPSchedule.from_betas()})()
    check_exportable(den, {"solver": "consistency", "sigma_data": 0.5})
    with pytest.raises(FewstepError, match="fix sigma_data at 0.5"):
        check_exportable(den, {"solver": "consistency", "sigma_data": 0.25})


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_plain_diffusers_pipeline_samples_as_the_pipeline_does_with_its_defaults(tiny_dirs, family):
    """A plain diffusers pipeline (no fewstep.json) is a teacher fewstep can sample, eval and bench: its sampler is the
    pipeline's own default steps and guidance_scale (read from its __call__) on fewstep's deterministic solver for its
    schedule. Reference: the diffusers pipeline itself, called on the same latents with that solver's diffusers
    scheduler (DDIMScheduler / FlowMatchEulerDiscreteScheduler from its config), on two prompts (with the empty prompt
    the guidance would cancel out: the guidance off by one is shown to move the result by > 100x the tolerance)."""
    import diffusers

    from fewstep.generate import Generator

    gen = Generator.load(tiny_dirs[family], device="cpu")
    expected_defaults = {"sd": ("ddim", 50, 7.5), "sd3": ("euler", 28, 7.0)}[family]
    s = gen.meta["sampler"]
    assert (s["solver"], s["steps"], s["guidance"]) == expected_defaults
    prompts = ["a red circle", "two small green triangles"]
    ours = gen(2, seed=3, steps=3, prompts=prompts)
    pipe = gen.pipeline.pipe
    if family == "sd":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(2, *gen.meta["sample_shape"], generator=torch.Generator().manual_seed(3))
    def theirs(guidance: float) -> torch.Tensor:
        return pipe(prompts, num_inference_steps=3, guidance_scale=guidance, latents=latents, output_type="pt").images * 2 - 1

    assert ours.shape == theirs(s["guidance"]).shape
    assert (ours - theirs(s["guidance"])).abs().max() < 1e-4  # measured 1.5e-6 (sd), 3.0e-6 (sd3)
    assert (ours - theirs(s["guidance"] + 1)).abs().max() > 1e-2  # measured 0.045, 0.11


def test_a_fewstep_run_directory_is_not_taken_for_a_plain_pipeline(tmp_path, tiny_dirs):
    from fewstep.export import is_plain_pipeline

    assert is_plain_pipeline(tiny_dirs["sd"]) and is_plain_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model_index.json").write_text("{}")
    (tmp_path / "final" / "fewstep.json").write_text("{}")
    assert not is_plain_pipeline(tmp_path / "final") and not is_plain_pipeline(tmp_path / "nothing")
    with pytest.raises(FewstepError, match="nor a diffusers pipeline"):
        load_final(tmp_path / "nothing")
