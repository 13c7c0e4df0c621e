"""Schedules and conversions against diffusers' own schedulers and exact algebra."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

from fewstep.errors import FewstepError
from fewstep.schedules import (
    FlowSchedule,
    VPSchedule,
    make_schedule,
    native_from_x0_eps,
    prediction_type_from_config,
    schedule_from_config,
    x0_eps_from_native,
)
from fewstep.testing.tiny import FLUX_SCHEDULER as TINY_FLUX_SCHEDULER


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(beta_schedule, zero_snr):
    kw = dict(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=zero_snr)
    ref = DDPMScheduler(**kw)
    ours = schedule_from_config({**ref.config, "_class_name": "DDPMScheduler"})
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=1e-5, atol=1e-7)


def test_add_noise_matches_diffusers():
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-5, rtol=1e-5)


def test_flow_add_noise_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    ours = FlowSchedule(shift=3.0)
    x0, eps = torch.randn(10, 4, 4, 4), torch.randn(10, 4, 4, 4)
    expected = ref.scale_noise(x0, ref.timesteps, eps)
    torch.testing.assert_close(ours.add_noise(x0, eps, ref.timesteps), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample", "flow"])
@pytest.mark.parametrize("schedule", [VPSchedule.from_betas(), FlowSchedule()])
def test_conversion_round_trips(ptype, schedule):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([10.0, 200.0, 500.0, 800.0, 990.0])
    alpha, sigma = schedule.coefficients(t, x0)
    x_t = alpha * x0 + sigma * eps
    native = native_from_x0_eps(x0, eps, alpha, sigma, ptype)
    x0_back, eps_back = x0_eps_from_native(native, x_t, alpha, sigma, ptype)
    torch.testing.assert_close(x0_back, x0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(eps_back, eps, atol=2e-5, rtol=1e-5)
    # and back to the native output again: eps -> x0 -> eps and friends
    torch.testing.assert_close(native_from_x0_eps(x0_back, eps_back, alpha, sigma, ptype), native, atol=2e-5, rtol=1e-5)


def test_v_prediction_closed_form_on_vp():
    """On VP (alpha^2 + sigma^2 = 1): x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v."""
    sch = VPSchedule.from_betas()
    x_t, v = torch.randn(4, 2), torch.randn(4, 2)
    alpha, sigma = sch.coefficients(torch.tensor([1.0, 100.0, 600.0, 999.0]), x_t)
    x0, eps = x0_eps_from_native(v, x_t, alpha, sigma, "v_prediction")
    torch.testing.assert_close(x0, alpha * x_t - sigma * v)
    torch.testing.assert_close(eps, sigma * x_t + alpha * v)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 4, 25, 50])
def test_vp_timesteps_match_ddim(spacing, n):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(n)
    ours = schedule_from_config({**ref.config, "_class_name": "DDIMScheduler"})
    assert ours.timesteps(n).tolist() == ref.timesteps.double().tolist()


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_flow_timesteps_match_diffusers(shift, n):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    ours = FlowSchedule(shift=shift).sampling_grid(n)
    np.testing.assert_allclose(ours.numpy(), (ref.sigmas.double() * 1000).numpy(), rtol=1e-5, atol=1e-4)


def test_clean_end_and_sd15_config():
    pndm = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, skip_prk_steps=True)
    sch = schedule_from_config({**pndm.config, "_class_name": "PNDMScheduler"})
    a, s = sch.alpha_sigma(torch.tensor([-1.0]))
    assert float(a**2) == pytest.approx(float(pndm.alphas_cumprod[0]), rel=1e-6)  # SD 1.5's own final step
    a, s = VPSchedule.from_betas().alpha_sigma(torch.tensor([-1.0]))
    assert float(a) == 1.0 and float(s) == 0.0
    a, s = FlowSchedule().alpha_sigma(torch.tensor([0.0, 1000.0]))
    assert a.tolist() == [1.0, 0.0] and s.tolist() == [0.0, 1.0]


def test_fractional_t_interpolates_between_neighbours():
    sch = VPSchedule.from_betas()
    a = sch.alpha_sigma(torch.tensor([500.0, 500.5, 501.0]))[0]
    assert a[0] > a[1] > a[2]


def test_prediction_types_and_errors():
    assert prediction_type_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler"}) == "flow"
    assert prediction_type_from_config({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}) == "v_prediction"
    with pytest.raises(FewstepError, match="valid: linear, scaled_linear, squaredcos_cap_v2"):
        VPSchedule.from_betas("cosine")
    with pytest.raises(FewstepError, match="valid: flow, vp"):
        make_schedule("edm")
    with pytest.raises(FewstepError, match="valid: epsilon, v_prediction, sample"):
        prediction_type_from_config({"prediction_type": "x0"})
    with pytest.raises(FewstepError, match="dynamic"):  # resolution-dependent: no grid without the token count
        schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}).timesteps(4)
    with pytest.raises(FewstepError, match="shift_terminal"):
        schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
                              "shift_terminal": 0.02})


#: FLUX.1-dev's scheduler config, as the tiny FLUX fixture carries it (fewstep/testing/tiny.py FLUX_SCHEDULER)
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, **TINY_FLUX_SCHEDULER}


@pytest.mark.parametrize("pixels", [512, 1024])
def test_flux_dynamic_shift_grid_equals_diffusers_at_two_resolutions(pixels):
    """FLUX.1's resolution-dependent grid: mu from the image's token count ((pixels / 16)^2: 8x VAE, 2x2 packing) as
    FluxPipeline's calculate_shift, and the shifted sigmas of FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=
    linspace(1, 1/n, n), mu) (FluxPipeline's call), to 1e-5."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (pixels // 16) ** 2
    ours = schedule_from_config(FLUX_SCHEDULER).for_sequence(tokens)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert abs(ours.mu - mu) < 1e-12
    ref = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    for n in (1, 4, 28):
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        grid = ours.timesteps(n)
        assert torch.allclose(grid / 1000, ref.sigmas[:-1].double(), atol=1e-5), (pixels, n)
        assert torch.allclose(grid, ref.timesteps.double(), atol=1e-3)
    static = schedule_from_config({**FLUX_SCHEDULER, "use_dynamic_shifting": False}).timesteps(28)
    assert (ours.timesteps(28) - static).abs().max() > 1  # the check can fail: the static shift-3 grid differs
