"""Solvers against diffusers' schedulers (single steps and trajectories) and against convergence order."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.data.mixtures import random_mixture, reference_ring
from fewstep.denoisers import MixtureDenoiser, MLPDenoiser, MLPNet, UNetDenoiser
from fewstep.errors import FewstepError
from fewstep.eval import sliced_wasserstein2
from fewstep.schedules import FlowSchedule, VPSchedule, schedule_from_config
from fewstep.solvers import DDIM, DPMSolverPP2M, Euler, make_solver, sample

from tests.helpers import tiny_unet2d


def _schedule(sched):
    return schedule_from_config({**sched.config, "_class_name": type(sched).__name__})


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_steps_equal_diffusers(ptype, spacing):
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, prediction_type=ptype, timestep_spacing=spacing)
    n = 10
    ref.set_timesteps(n)
    unet = tiny_unet2d()
    D = UNetDenoiser(unet, _schedule(ref), ptype)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = D.schedule.sampling_grid(n)
    assert grid[:-1].tolist() == ref.timesteps.double().tolist()
    with torch.no_grad():
        for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            expected = ref.step(unet(x, int(t)).sample, int(t), x).prev_sample
            ours, _ = DDIM().step(D, x, t, t_next)
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
            x = expected


def test_dpmsolver_pp_2m_trajectory_equals_diffusers():
    ref = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      algorithm_type="dpmsolver++", solver_order=2)
    n = 8
    ref.set_timesteps(n)
    unet = tiny_unet2d(seed=1)
    D = UNetDenoiser(unet, _schedule(ref), "epsilon")
    grid = torch.cat([ref.timesteps.double(), torch.tensor([-1.0], dtype=torch.float64)])
    x_ref = x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    state = None
    solver = DPMSolverPP2M()
    with torch.no_grad():
        for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            x_ref = ref.step(unet(x_ref, int(t)).sample, int(t), x_ref).prev_sample
            x, state = solver.step(D, x, t, t_next, None, state)
            torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_steps_equal_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    n = 6
    ref.set_timesteps(n)
    torch.manual_seed(0)
    D = MLPDenoiser(MLPNet(dim=3, hidden=32, depth=2), FlowSchedule(shift=shift), "flow")
    grid = D.schedule.sampling_grid(n)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            expected = ref.step(D.native(x, t), t, x).prev_sample
            for solver in (Euler(), DDIM()):  # DDIM on a flow schedule is Euler exactly
                ours, _ = solver.step(D, x, grid[i].item(), grid[i + 1].item())
                torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
            x = expected


def test_euler_equals_ddim_on_vp():
    sch = VPSchedule.from_betas()
    D = MixtureDenoiser(reference_ring(), sch)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for t, t_next in [(999.0, 799.0), (500.0, 480.0), (19.0, -1.0)]:
        torch.testing.assert_close(Euler().step(D, x, t, t_next)[0], DDIM().step(D, x, t, t_next)[0], atol=1e-5, rtol=1e-5)


def _endpoint_error(D, solver, n, x, reference):
    return (sample(D, make_solver(solver), x, D.schedule.sampling_grid(n)) - reference).norm(dim=1).mean().item()


def test_heun_and_dpmpp_are_second_order_euler_first_order():
    """Doubling the steps cuts a p-th order solver's error by about 2^p (reference: Heun at 512 steps)."""
    D = MixtureDenoiser(random_mixture(3, 4, seed=3), FlowSchedule())
    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    reference = sample(D, make_solver("heun"), x, D.schedule.sampling_grid(512))
    ratios = {}
    for solver in ("euler", "heun", "dpmpp_2m"):
        e1, e2 = _endpoint_error(D, solver, 16, x, reference), _endpoint_error(D, solver, 32, x, reference)
        ratios[solver] = e1 / e2
    assert 1.6 < ratios["euler"] < 2.6, ratios
    assert ratios["heun"] > 3.0, ratios
    assert ratios["dpmpp_2m"] > 3.0, ratios


def test_ddim_eta_adds_the_right_noise():
    """With eta = 1 and a perfect denoiser of a point mass, DDIM's step is the DDPM posterior draw."""
    from fewstep.data.mixtures import GaussianMixture

    point = GaussianMixture(torch.ones(1), torch.tensor([[1.5, -0.5]]), 1e-12 * torch.eye(2)[None])
    sch = VPSchedule.from_betas()
    D = MixtureDenoiser(point, sch)
    x = sch.add_noise(torch.tensor([[1.5, -0.5]]).expand(20000, 2), torch.randn(20000, 2), 600.0)
    out, _ = DDIM(eta=1.0, generator=torch.Generator().manual_seed(0)).step(D, x, 600.0, 400.0)
    a2, s2 = sch.alpha_sigma(torch.tensor(400.0))
    # a point-mass data set keeps the forward marginal: x_400 ~ N(a2 x0, s2^2 I)
    assert torch.allclose(out.mean(0), a2.float() * torch.tensor([1.5, -0.5]), atol=0.02)
    assert torch.allclose(out.std(0), s2.float().expand(2), rtol=0.03)


def test_reference_mixture_sw2_with_50_ddim_steps():
    """Must-show: the analytic teacher, 50 DDIM steps on SD 1.5's schedule, SW2 <= 0.08 (50k samples)."""
    m = reference_ring()
    sch = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)
    x = sample(MixtureDenoiser(m, sch), DDIM(), torch.randn(50_000, 2, generator=torch.Generator().manual_seed(3)),
               sch.sampling_grid(50))
    sw2 = sliced_wasserstein2(x, m.sample(50_000, torch.Generator().manual_seed(1)))
    assert sw2 <= 0.08, sw2


def test_unknown_solver():
    with pytest.raises(FewstepError, match="valid: consistency, ddim, dpmpp_2m, euler, heun, renoise"):
        make_solver("rk4")
