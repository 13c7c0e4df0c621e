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
