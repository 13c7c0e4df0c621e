"""sCM (continuous-time consistency distillation): TrigFlow conversions against their closed forms, the JVP
tangent against central differences, the tangent of an exact Gaussian consistency function (zero), one loss
step by hand, the sampler against diffusers' SCMScheduler, and a resumed run equal to an uninterrupted one."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from safetensors.torch import load_file

from fewstep.config import validate
from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser, MLPDenoiser, MLPNet, UNetDenoiser
from fewstep.denoisers.trigflow import TrigFlowView, consistency_from_F, native_time, trig_range, trig_time, trigflow_timesteps
from fewstep.errors import FewstepError
from fewstep.losses import SCMLoss
from fewstep.losses.base import Models
from fewstep.losses.scm import has_group_norm, jvp, normalize_tangent, scm_tangent
from fewstep.run import run_recipe
from fewstep.sampling import sampler_grid, sampler_solver
from fewstep.schedules import FlowSchedule, VPSchedule
from fewstep.solvers import sample
from tests.helpers import tiny_unet2d

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
SCHEDULES = {"vp": lambda: VPSchedule.from_betas(**SD), "flow": FlowSchedule}


def _mlp(schedule, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = MLPNet(dim=2, hidden=32, depth=2).to(dtype)
    return MLPDenoiser(net, schedule, precondition="edm") if schedule.kind == "vp" else MLPDenoiser(net, schedule, "flow")


# ----------------------------------------------------------------------------- schedules and TrigFlow
def test_vp_alpha_bar_is_differentiable_and_exact_at_integers():
    sch = VPSchedule.from_betas(**SD)
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(sch.alpha_sigma(t)[0] ** 2, sch.alphas_cumprod.sqrt() ** 2)
    for t0 in (10.0, 500.0, 500.3, 998.5, 999.0):  # integer t included: the segment's slope, not zero
        with fwAD.dual_level():
            a = sch.alpha_sigma(fwAD.make_dual(torch.tensor([t0], dtype=torch.float64), torch.ones(1, dtype=torch.float64)))[0]
            slope = fwAD.unpack_dual(a).tangent
        h = 1e-6 if t0 < 999 else -1e-6  # one-sided: the segment that starts at an integer t (the last one ends there)
        fd = (sch.alpha_sigma(torch.tensor([t0 + h], dtype=torch.float64))[0] - sch.alpha_sigma(torch.tensor([t0], dtype=torch.float64))[0]) / h
        assert slope is not None and abs(float(slope - fd)) < 1e-6 * abs(float(fd)) + 1e-9, (t0, slope, fd)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_t_from_ratio_inverts_the_noise_to_signal_ratio(kind):
    sch = SCHEDULES[kind]()
    r = torch.tensor([0.05, 0.3, 1.0, 4.0, 14.0], dtype=torch.float64)
    alpha, sigma = sch.alpha_sigma(sch.t_from_ratio(r))
    assert torch.allclose(sigma / alpha, r, rtol=1e-12)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_trigflow_point_is_the_native_point_with_the_same_snr(kind):
    """x_hat = cos x0 + sin sigma_d eps maps to x_t = alpha x0 + sigma eps at the native t with sigma / alpha =
    sigma_d tan t_hat (VP: the scale is 1 / sqrt(cos^2 + sigma_d^2 sin^2), the closed form)."""
    sch, sd = SCHEDULES[kind](), 0.5
    x0, eps = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    t_hat = torch.tensor([0.1, 0.5, 0.9, 1.2, 1.5], dtype=torch.float64)
    x_hat = torch.cos(t_hat)[:, None] * x0 + torch.sin(t_hat)[:, None] * sd * eps
    x_t, t = TrigFlowView(_mlp(sch), sd).to_native(x_hat, t_hat)
    alpha, sigma = sch.alpha_sigma(t)
    assert torch.allclose(x_t, alpha[:, None] * x0 + sigma[:, None] * eps, atol=1e-12)
    assert torch.allclose(trig_time(sch, t, sd), t_hat, atol=1e-12)
    if kind == "vp":
        scale = 1 / (torch.cos(t_hat) ** 2 + sd**2 * torch.sin(t_hat) ** 2).sqrt()
        assert torch.allclose(x_t, scale[:, None] * x_hat, atol=1e-12)
    lo, hi = trig_range(sch, sd)
    assert lo < 0.06 and hi == pytest.approx(math.atan2(float(sch.alpha_sigma(999.0)[1]), float(sch.alpha_sigma(999.0)[0]) * sd)
                                             if kind == "vp" else math.pi / 2 - 1e-4)


def test_consistency_function_of_a_view_is_the_denoisers_x0():
    den = _mlp(VPSchedule.from_betas(**SD))
    view = TrigFlowView(den, 0.5)
    x_hat, t_hat = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0.2, 0.7, 1.1, 1.5], dtype=torch.float64)
    f = consistency_from_F(view.F(x_hat, t_hat), x_hat, t_hat, 0.5)
    x_t, t = view.to_native(x_hat, t_hat)
    assert torch.allclose(f, den(x_t, t).double(), atol=1e-10)


@pytest.mark.parametrize("precondition", ["edm", "trigflow"])
def test_direct_trigflow_F_equals_the_native_round_trip(precondition):
    """MLPDenoiser.trigflow_F (one network call) against F through the native point (to_native, the denoiser's x0,
    velocity / sigma_d): the same values and the same JVP tangent, in float64, with class labels; no direct path
    for another sigma_d or without preconditioning."""
    torch.manual_seed(0)
    den = MLPDenoiser(MLPNet(dim=2, hidden=32, depth=2, num_classes=3).double(), VPSchedule.from_betas(**SD),
                      precondition=precondition, sigma_data=0.5)
    view, cond = TrigFlowView(den, 0.5), {"class_labels": torch.tensor([0, 1, 2, 3, 1, 0])}
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.linspace(*trig_range(den.schedule, 0.5), 6, dtype=torch.float64)
    direct = lambda a, b: view.F(a, b, cond)  # noqa: E731
    round_trip = lambda a, b: view.velocity(a, b, cond) / 0.5  # noqa: E731
    assert den.trigflow_F(x, t, 0.5, cond) is not None
    torch.testing.assert_close(direct(x, t), round_trip(x, t), rtol=1e-10, atol=1e-10)
    vx, vt = torch.randn_like(x), torch.rand_like(t)
    (_, tan_direct), (_, tan_round) = jvp(direct, (x, t), (vx, vt)), jvp(round_trip, (x, t), (vx, vt))
    torch.testing.assert_close(tan_direct, tan_round, rtol=1e-8, atol=1e-8)
    assert den.trigflow_F(x, t, 0.4, cond) is None
    assert MLPDenoiser(den.net, den.schedule).trigflow_F(x, t, 0.5, None) is None


# ----------------------------------------------------------------------------- the tangent
def _jvp_vs_central_difference(fn, x, t, vx, vt, h):
    _, tangent = jvp(fn, (x, t), (vx, vt))
    with torch.no_grad():
        fd = (fn(x + h * vx, t + h * vt) - fn(x - h * vx, t - h * vt)) / (2 * h)
    return float((tangent - fd).norm() / fd.norm())


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_jvp_of_the_mlp_view_equals_a_central_difference(kind):
    view = TrigFlowView(_mlp(SCHEDULES[kind]()), 0.5)
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.linspace(0.2, 1.45, 6, dtype=torch.float64)
    vx, vt = torch.randn_like(x), torch.ones_like(t)
    assert _jvp_vs_central_difference(lambda a, b: view.F(a, b), x, t, vx, vt, 1e-6) < 1e-3


def test_group_norm_guard_only_where_a_group_norm_is():
    """SCMLoss skips the contiguous-group_norm guard for a network without GroupNorm (the MLP; the tangent is the
    same with and without it) and keeps it for the UNet, whose forward-mode group_norm needs it."""
    den = _mlp(SCHEDULES["vp"]())
    assert not has_group_norm(den) and has_group_norm(UNetDenoiser(tiny_unet2d(), VPSchedule.from_betas(**SD), "epsilon"))
    view = TrigFlowView(den, 0.5)
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.linspace(0.2, 1.45, 6, dtype=torch.float64)
    v = (torch.randn_like(x), torch.ones_like(t))
    on = jvp(lambda a, b: view.F(a, b), (x, t), v, contiguous_group_norm=True)
    off = jvp(lambda a, b: view.F(a, b), (x, t), v, contiguous_group_norm=False)
    assert torch.allclose(on[0], off[0], rtol=1e-12, atol=0) and torch.allclose(on[1], off[1], rtol=1e-10, atol=1e-12)


def test_jvp_of_the_tiny_unet_view_equals_a_central_difference():
    """Through UNet2DModel (its mid-block attention needs the math SDPA backend and a contiguous group_norm input
    under forward-mode AD). The UNet embeds time in float32, so h is large enough for float32's rounding of t."""
    den = UNetDenoiser(tiny_unet2d().double(), VPSchedule.from_betas(**SD), "epsilon")
    view = TrigFlowView(den, 0.5)
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0.6, 1.2], dtype=torch.float64)
    vx = torch.randn_like(x)
    assert _jvp_vs_central_difference(lambda a, b: view.F(a, b), x, t, vx, torch.zeros_like(t), 1e-5) < 1e-6
    assert _jvp_vs_central_difference(lambda a, b: view.F(a, b), x, t, vx, torch.ones_like(t), 3e-5) < 1e-3


def test_gaussian_consistency_function_has_zero_tangent():
    """Data N(0, s^2 I): the exact consistency function is affine, f(x_hat, t) = x_hat s / sqrt(cos^2 s^2 + sin^2
    sigma_d^2), and the PF-ODE velocity comes from the closed-form posterior mean. Its tangent g is zero; a
    perturbed f gives a nonzero one."""
    sd, s = 0.5, 1.7

    def std(t):
        return torch.sqrt(torch.cos(t) ** 2 * s * s + torch.sin(t) ** 2 * sd * sd)

    def exact(x, t):
        return x * (s / std(t))[:, None]

    def velocity(x, t):  # (cos x - E[x0 | x]) / sin, E[x0 | x] = cos s^2 / std^2 x
        k = torch.cos(t) * s * s / std(t) ** 2
        return ((torch.cos(t) - k) / torch.sin(t))[:, None] * x

    x, t = torch.randn(6, 3, dtype=torch.float64), torch.linspace(0.2, 1.4, 6, dtype=torch.float64)
    v, scale = velocity(x, t), torch.cos(t) * torch.sin(t)
    for f, zero in ((exact, True), (lambda x, t: exact(x, t) * (1 + 0.1 * torch.sin(t))[:, None], False)):
        def F(x_, t_, f=f):
            return (torch.cos(t_)[:, None] * x_ - f(x_, t_)) / (sd * torch.sin(t_)[:, None])

        F_minus, F_jvp = jvp(F, (x, t), (scale[:, None] * v, scale))
        g = scm_tangent(F_minus, F_jvp, x, v, t, sd)
        assert (float(g.abs().max()) < 1e-12) == zero, float(g.abs().max())


def test_tangent_normalization():
    g = torch.randn(3, 4, 4, dtype=torch.float64)
    n = normalize_tangent(g, 0.1, "full")
    assert torch.allclose(n, g / (g.flatten(1).norm(dim=1) + 0.1)[:, None, None])
    rms = normalize_tangent(g, 0.1, "rms")
    assert torch.allclose(rms, g / (g.flatten(1).norm(dim=1) / 4 + 0.1)[:, None, None])


# ----------------------------------------------------------------------------- the loss
def _loss_and_models(**settings):
    sch = VPSchedule.from_betas(**SD)
    teacher = MixtureDenoiser(make_mixture("ring"), sch)
    student = _mlp(sch, dtype=torch.float32)
    loss = SCMLoss.from_models(Models(teacher=teacher, student=student, schedule=sch), **settings)
    return loss, student, teacher


def test_one_step_by_hand():
    """The loss of a batch equals Algorithm 1 written out: the draws from each sample's seed, the teacher's
    velocity, a central-difference tangent in float64, the normalization and the adaptive weight (0 at init)."""
    loss, student, teacher = _loss_and_models(tangent_warmup_steps=4)
    loss.iteration.fill_(2)  # r = 0.5
    seeds = torch.arange(8) + 100
    x0 = make_mixture("ring").sample(8, torch.Generator().manual_seed(0))
    out = loss("student", {"x0": x0, "seeds": seeds}, student, teacher)
    g = [torch.Generator().manual_seed(int(s)) for s in seeds]
    e = torch.stack([torch.randn(3, generator=gi) for gi in g])  # one draw per sample: tau's, then z's
    tau, z = e[:, 0].double() * 1.4 - 1.0, 0.5 * e[:, 1:]
    t = torch.atan(torch.exp(tau) / 0.5).clamp(*trig_range(student.schedule, 0.5))
    x_t = (torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z).double()
    v = TrigFlowView(teacher, 0.5).velocity(x_t, t)
    s64 = _mlp(student.schedule, dtype=torch.float64)
    s64.net.load_state_dict(student.net.state_dict())
    F = lambda a, b: TrigFlowView(s64, 0.5).F(a, b)  # noqa: E731
    h, c = 1e-6, torch.cos(t)[:, None]
    with torch.no_grad():
        dF = (F(x_t + h * v, t + h) - F(x_t - h * v, t - h)) / (2 * h)
        F_minus = F(x_t, t)
    sn = torch.sin(t)[:, None]
    g = -c * c * (0.5 * F_minus - v) - 0.5 * c * sn * (x_t + 0.5 * dF)
    g = g / ((g.norm(dim=1) / math.sqrt(2) + 0.1)[:, None])
    expected = ((g**2).mean(1) / (0.5 * torch.tan(t))).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    assert out.logs["tangent_warmup"] == 0.5
    out.loss.backward()
    assert loss.weighting.linear.bias.grad is not None and float(loss.weighting.linear.bias.grad) != 0
    assert all(p.grad is not None for p in student.net.parameters())


def test_settings_and_state():
    loss, _, _ = _loss_and_models()
    assert loss.trains() == {"weighting": "weighting"} and loss.phase_modules("student") == ("student", "weighting")
    assert SCMLoss.settings()["p_mean"] == -1.0 and SCMLoss.settings()["tangent_c"] == 0.1
    loss.on_step_end("student", None)
    assert int(loss.extra_state()["iteration"]) == 1
    other, _, _ = _loss_and_models()
    other.load_extra_state(loss.extra_state())
    assert int(other.iteration) == 1
    with pytest.raises(FewstepError, match="valid: rms, full"):
        _loss_and_models(tangent_norm="l1")
    with pytest.raises(FewstepError, match="needs a teacher"):
        SCMLoss.from_models(Models(teacher=None, student=_mlp(FlowSchedule())))


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_renoise_on_the_trigflow_grid_is_scmschedulers_sampler(steps):
    """fewstep's sampler of an sCM student (renoise, spacing trigflow) against diffusers' SCMScheduler run in TrigFlow
    coordinates on the same grid, with model output sigma_d F of the view and the same noise generator."""
    from diffusers import SCMScheduler

    sch, sd = VPSchedule.from_betas(**SD), 0.5
    den = _mlp(sch, dtype=torch.float32)
    settings = {"solver": "renoise", "spacing": "trigflow", "steps": steps, "sigma_data": sd}
    grid = sampler_grid(sch, settings)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    ours = sample(den, sampler_solver(settings, seed=7), noise, grid)

    t_hat = torch.cat([trig_time(sch, grid[:-1], sd), torch.zeros(1, dtype=torch.float64)])
    scm = SCMScheduler(sigma_data=sd)
    scm.set_timesteps(steps, timesteps=t_hat.tolist(), max_timesteps=None, intermediate_timesteps=None)
    view, gen = TrigFlowView(den, sd), torch.Generator().manual_seed(7)
    x_hat = noise / TrigFlowView(den, sd).to_native(torch.ones(1, 2), t_hat[:1])[0]  # the native noise, in TrigFlow
    for s in scm.timesteps[:-1]:
        tt = torch.full((16,), float(s), dtype=torch.float64)
        with torch.no_grad():
            out = view.velocity(x_hat, tt)
        x_hat = scm.step(out, s, x_hat, generator=gen).prev_sample
    assert torch.allclose(ours, x_hat, atol=1e-5), float((ours - x_hat).abs().max())
    if steps == 2:
        assert float(t_hat[1]) == pytest.approx(1.3, abs=2e-3)  # SCMScheduler's intermediate time (VP rounds to 532)


@pytest.mark.parametrize("intermediate", [1.3, 1.1, 1.02])
def test_the_two_step_middle_time_is_scmschedulers_intermediate_timesteps(intermediate):
    """``intermediate_t`` (a loss setting, written to the sampler) places the two-step grid's middle time where
    SCMScheduler.set_timesteps(2, intermediate_timesteps=...) puts it; the exported SD student's pipeline call (its
    LCMScheduler timesteps) is that grid, and a flow transformer's, whose scheduler keeps its own grid, is refused."""
    from diffusers import SCMScheduler

    from fewstep.export import pipeline_call

    sch = VPSchedule.from_betas(**SD)
    loss, _, _ = _loss_and_models(intermediate_t=intermediate)
    settings = {"solver": "renoise", "spacing": "trigflow", "steps": 2, **loss.sampler_settings()}
    grid = sampler_grid(sch, settings)
    scm = SCMScheduler(sigma_data=0.5)
    scm.set_timesteps(2, intermediate_timesteps=intermediate)
    expected = native_time(sch, scm.timesteps[1:2].double(), 0.5).round()
    assert grid.tolist() == [999.0, float(expected), sch.t_clean]
    kwargs, _ = pipeline_call({"sampler": settings}, 2, "sd", sch)
    assert kwargs["timesteps"] == [999, int(expected)]
    assert pipeline_call({"sampler": settings}, 1, "sd", sch)[0]["timesteps"] == [999]
    none, why = pipeline_call({"sampler": settings}, 2, "sd3", FlowSchedule())
    assert none is None and "TrigFlow grid at 2 steps" in why
    with pytest.raises(FewstepError, match=r"intermediate_t must lie in \(0, pi/2\)"):
        _loss_and_models(intermediate_t=1.6)
    # a LoRA student's model card: SD's call carries the grid; a flow transformer's says why there is none
    from fewstep.export import lora_usage

    meta = {"sampler": settings, "base": "BASE", "scheduler": "LCMScheduler", "pipeline_class": "StableDiffusionPipeline",
            "family": "sd"}
    assert f"timesteps=[999, {int(expected)}]" in lora_usage(meta, sch)
    card = lora_usage({**meta, "family": "sd3", "pipeline_class": "StableDiffusion3Pipeline"}, FlowSchedule())
    assert "num_inference_steps" not in card and "TrigFlow grid at 2 steps" in card


def test_trigflow_grid():
    assert trigflow_timesteps(VPSchedule.from_betas(**SD), 1).tolist() == [999.0]
    ts = trigflow_timesteps(FlowSchedule(), 2)
    assert ts[0] == 1000.0 and float(native_time(FlowSchedule(), torch.tensor([1.3]), 0.5)) == pytest.approx(float(ts[1]))


# ----------------------------------------------------------------------------- through the loop
def _ring_recipe(out, max_steps):
    return {
        "name": "tiny_scm", "schedule": {"name": "vp", **SD},
        "teacher": {"kind": "mixture", "mixture": {"name": "ring"}},
        "student": {"kind": "mlp", "config": {"dim": 2, "hidden": 32, "depth": 2}, "precondition": "edm"},
        "loss": {"name": "scm", "tangent_warmup_steps": 4}, "data": {"name": "mixture", "size": 1000},
        "optimizer": {"name": "AdamW", "lr": 0.001}, "optimizers": {"weighting": {"lr": 0.01}},
        "sample": {"solver": "renoise", "spacing": "trigflow", "steps": 2, "num": 16},
        "train": {"output_dir": str(out), "max_steps": max_steps, "batch_size": 16, "checkpoint_every": 3,
                  "progress": False, "ema_decay": 0.9},
    }


def test_resume_is_bit_exact_with_the_weighting_and_its_optimizer(tmp_path):
    assert run_recipe(validate(_ring_recipe(tmp_path / "ref", 6)), log=lambda m: None).status == "finished"
    assert run_recipe(validate(_ring_recipe(tmp_path / "cut", 3)), log=lambda m: None).status == "finished"
    assert run_recipe(validate(_ring_recipe(tmp_path / "cut", 6)), log=lambda m: None).status == "finished"
    ckpt = "checkpoints/step-00000006"
    for name in ("student", "module.weighting", "optim.student", "ema", "loss_state"):
        a, b = (load_file(str(tmp_path / r / ckpt / f"{name}.safetensors")) for r in ("ref", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = load_file(str(tmp_path / "ref" / ckpt / "loss_state.safetensors"))
    assert int(state["iteration"]) == 6
    weighting = load_file(str(tmp_path / "ref" / ckpt / "module.weighting.safetensors"))
    assert float(weighting["linear.bias"].abs()) > 0  # the adaptive weight trained


def test_trigflow_preconditioning_is_edm_in_trigflow_time():
    """precondition trigflow: x0_hat = cos t x_hat + sd sin t F(x_hat / sd, t) with t = atan(s / sd) and x_hat = cos t
    x_t / alpha (Lu & Song 2025's TrigFlow form), written out by hand against the MLP's own output; edm differs only
    in the time input (log(s) / 4)."""
    import math

    from fewstep.denoisers import MLPDenoiser, MLPNet
    from fewstep.schedules import VPSchedule

    sch = VPSchedule.from_betas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(0)
    net = MLPNet(dim=2, hidden=16, depth=2, num_classes=0).double()
    den = MLPDenoiser(net, sch, precondition="trigflow", sigma_data=0.5)
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([3.0, 100.0, 400.0, 800.0, 999.0], dtype=torch.float64)
    alpha, sigma = sch.coefficients(t, x)
    s = sigma / alpha
    t_hat = torch.atan(s / 0.5)
    x_hat = torch.cos(t_hat) * x / alpha
    expected = torch.cos(t_hat) * x_hat + 0.5 * torch.sin(t_hat) * net(x_hat / 0.5, t_hat.reshape(-1))
    torch.testing.assert_close(den(x, t), expected, rtol=1e-12, atol=1e-12)
    assert float(t_hat.max()) < math.pi / 2
    edm = MLPDenoiser(net, sch, precondition="edm", sigma_data=0.5)
    assert (edm(x, t) - den(x, t)).abs().max() > 1e-3  # the time input is what differs
