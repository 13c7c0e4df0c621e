"""f-divergence distribution matching: DMD equivalence at h = 1, the h(r) family, phases, ratio bins."""
import types

import pytest
import torch
import torch.nn.functional as F

from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser, MLPDenoiser, MLPNet
from fewstep.discriminators import XTDiscriminator
from fewstep.errors import FewstepError
from fewstep.losses import FDivergenceLoss
from fewstep.losses.base import Models
from fewstep.losses.fdivergence import WEIGHTINGS, density_ratio, dm_loss
from fewstep.schedules import VPSchedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _dmd_reference(x, x0_real, x0_fake):
    """DMD2's generator loss written out independently (Yin et al. 2024, their public formula)."""
    p_real = x - x0_real
    p_fake = x - x0_fake
    grad = (p_real - p_fake) / p_real.abs().mean(dim=list(range(1, x.ndim)), keepdim=True)
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


@pytest.mark.parametrize("shape", [(6, 2), (3, 4, 5, 5)])
def test_reverse_kl_equals_dmd_loss_and_gradient(shape):
    torch.manual_seed(0)
    x0_real, x0_fake = torch.randn(shape), torch.randn(shape)
    x1 = torch.randn(shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    ours, _ = dm_loss(x1, x0_real, x0_fake, WEIGHTINGS["reverse_kl"](torch.rand(shape[0]) + 0.5))
    ref = _dmd_reference(x2, x0_real, x0_fake)
    assert torch.allclose(ours, ref, rtol=1e-6)
    ours.backward()
    ref.backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-8)
    # the documented reduction: d loss / dx = grad / numel
    _, grad = dm_loss(x1.detach(), x0_real, x0_fake)
    assert torch.allclose(x1.grad, grad / x1.numel(), rtol=1e-5, atol=1e-9)


def test_h_weights_scale_each_sample_by_h_over_its_batch_mean():
    torch.manual_seed(1)
    x, x0_real, x0_fake = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    r = density_ratio(torch.tensor([-12.0, -1.0, 0.0, 2.0, 30.0]))
    assert torch.allclose(r, torch.tensor([0.1, torch.e**-1, 1.0, torch.e**2, 20.0]))  # clamp, exp, clip
    for name, h_fn in WEIGHTINGS.items():
        h = h_fn(r)
        _, g = dm_loss(x, x0_real, x0_fake, h)
        _, g1 = dm_loss(x, x0_real, x0_fake)
        assert torch.allclose(g, g1 * (h / h.mean())[:, None], rtol=1e-5), name
    expected = {"forward_kl": r, "jensen_shannon": r / (1 + r), "squared_hellinger": r.sqrt(), "neyman_chi2": 1 / r,
                "jeffreys": 1 + r, "softened": 1 / (1 + r)}
    for name, v in expected.items():
        assert torch.allclose(WEIGHTINGS[name](r), v)


def _setup(divergence="jensen_shannon", **kw):
    sch = VPSchedule.from_betas(**SD)
    teacher = MixtureDenoiser(make_mixture("ring"), sch)
    torch.manual_seed(0)
    student = MLPDenoiser(MLPNet(dim=2, hidden=32, depth=2, num_classes=0), sch, precondition="edm")
    loss = FDivergenceLoss.from_models(Models(teacher, student, sch, sample_shape=(2,)), divergence=divergence,
                                       gan_weight=kw.pop("gan_weight", 0.01), **kw)
    return teacher, student, loss


def test_phases_cycle_and_train_their_own_modules():
    """DMD2's cadence (tianweiy/DMD2 main/train_sd.py): the fake score and the discriminator update together on
    every non-generator step, so the discriminator gets fake_updates updates per generator update."""
    teacher, student, loss = _setup(fake_updates=2)
    assert [loss.phase_for(i) for i in range(6)] == ["fake_score", "fake_score", "generator"] * 2
    assert set(loss.modules_to_train()) == {"fake_score", "discriminator"}
    assert loss.phase_modules("fake_score") == ("fake_score", "discriminator")
    batch = {"x0": make_mixture("ring").sample(16), "seeds": torch.arange(16)}
    for phase, owners in (("fake_score", (loss.fake_score.net, loss.discriminator)), ("generator", (student.net,))):
        for m in (loss.fake_score.net, loss.discriminator, student.net):
            m.zero_grad(set_to_none=True)
        out = loss(phase, batch, student, teacher)
        out.loss.backward()
        for owner in owners:
            assert all(p.grad is not None for p in owner.parameters()), phase
        if phase != "generator":
            assert all(p.grad is None for p in student.net.parameters()), phase
            assert torch.allclose(out.loss, out.logs["fake_score_loss"] + out.logs["disc_loss"])
    assert {"r_mean", "h_mean", "dm_grad_norm", "gan_generator"} <= set(out.logs)


def test_fake_score_is_a_fresh_network_for_a_weightless_teacher():
    teacher, student, loss = _setup("reverse_kl", gan_weight=0.0)
    assert loss.phases == ("fake_score", "generator") and set(loss.needs) == {"cond"}
    assert loss.fake_score.net is not student.net
    assert not all(torch.equal(a, b) for a, b in zip(loss.fake_score.net.parameters(), student.net.parameters()))


def test_bad_settings_are_refused_with_the_valid_names():
    with pytest.raises(FewstepError, match="unknown divergence .jensen_shanon.; valid: forward_kl, jeffreys, jensen_shannon"):
        _setup("jensen_shanon")
    with pytest.raises(FewstepError, match="needs gan_weight > 0"):
        _setup("forward_kl", gan_weight=0.0)


def test_ratio_bins_are_running_means_and_checkpoint():
    teacher, student, loss = _setup(ratio_bins=4, ratio_momentum=0.5)
    r = loss._ratio(torch.zeros(4), torch.tensor([0.0, 300.0, 600.0, 900.0]), 1000)  # logit 0: r = 1 everywhere
    assert torch.allclose(loss.ratio_mean, torch.ones(4))
    loss._ratio(torch.full((4,), 2.0), torch.tensor([0.0, 300.0, 600.0, 900.0]), 1000)
    assert torch.allclose(loss.ratio_mean, torch.full((4,), 0.5 + 0.5 * torch.e**2))
    state = loss.extra_state()
    _, _, other = _setup(ratio_bins=4)
    other.load_extra_state(state)
    assert torch.equal(other.ratio_mean, loss.ratio_mean)
    assert torch.equal(r, torch.ones(4))


def test_xt_discriminator_shapes():
    d = XTDiscriminator((1, 8, 8), num_classes=10)
    out = d(torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0]), {"class_labels": torch.tensor([0, 5, 10])})
    assert out.shape == (3,)


def test_sd_dmd_student_exports_to_plain_diffusers(tmp_path, tiny_dirs, plain_one_step):
    """A reverse-KL SD student runs on prompts alone; exported with LCMScheduler (c_skip = 0) its one-step
    image in plain diffusers equals fewstep's own sample."""
    from diffusers import LCMScheduler

    from fewstep.build import build
    from fewstep.config import validate
    from fewstep.generate import Generator

    recipe = validate({
        "name": "t", "teacher": {"kind": "pipeline", "path": str(tiny_dirs["sd"])},
        "student": {"kind": "pipeline", "init": "teacher"},
        "loss": {"name": "fdistill", "divergence": "reverse_kl", "guidance": 1.75}, "data": {"name": "prompts"},
        "sample": {"solver": "renoise", "spacing": "trailing", "steps": 1},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False},
    })
    b = build(recipe)
    assert set(b.loss.needs) == {"cond"} and b.loss.phases == ("fake_score", "generator")
    batch = {**b.prepare({"prompt": ["a cat", "a dog"]}), "seeds": torch.arange(2)}
    out = b.loss("generator", batch, b.student.denoiser, b.teacher.denoiser)
    assert torch.isfinite(out.loss)
    final = tmp_path / "final"
    b.export(b.student.denoiser, final)
    ours = Generator.load(str(final))(1, seed=0, prompts=["a red bicycle"])
    pipe, image = plain_one_step(final, "a red bicycle", 1.0)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert torch.allclose(ours, image, atol=1e-4)
    four = pipe("a red bicycle", timesteps=[999, 749, 499, 249], guidance_scale=1.0, output_type="pt").images
    assert torch.isfinite(four).all()


def test_divergences_other_than_reverse_kl_refuse_prompt_only_data(tmp_path, tiny_dirs, capsys):
    import yaml

    from fewstep.cli import main
    from fewstep.config import load_recipe

    raw = load_recipe("sd15_fdistill_js").raw
    raw.update(data={"name": "prompts"}, teacher={"kind": "pipeline", "path": str(tiny_dirs["sd"])})
    raw["train"]["output_dir"] = str(tmp_path / "x")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["distill", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs data with x0" in err[0] and "for its discriminator" in err[0], err
    assert not (tmp_path / "x").exists()


def test_resume_restores_fake_score_discriminator_optimizers_and_ratio_bins(tmp_path):
    """Killed mid-cycle and resumed, an f-distill run ends with every checkpointed group bit-identical
    to an uninterrupted run: generator, fake score, discriminator, their optimizers and the ratio bins."""
    import os
    import signal

    from safetensors.torch import load_file

    from fewstep.checkpoint import checkpoint_dirs
    from fewstep.config import validate
    from fewstep.run import build_loop, prepare_run_dir, run_recipe

    def raw(out, **train):
        return {
            "name": "fd", "schedule": {"name": "vp"}, "teacher": {"kind": "mixture"},
            "student": {"kind": "mlp", "config": {"dim": 2, "hidden": 16, "depth": 2, "num_classes": 0}, "precondition": "edm"},
            "loss": {"name": "fdistill", "divergence": "jensen_shannon", "gan_weight": 0.01, "fake_updates": 2, "ratio_bins": 4},
            "data": {"name": "mixture", "size": 500}, "optimizer": {"name": "AdamW", "lr": 0.001},
            "optimizers": {"discriminator": {"lr": 0.002}},
            "sample": {"solver": "renoise", "spacing": "trailing", "steps": 1, "num": 8},
            "train": {"output_dir": str(out), "max_steps": 12, "batch_size": 16, "checkpoint_every": 5, "progress": False,
                      **train},
        }

    assert run_recipe(validate(raw(tmp_path / "ref")), log=lambda m: None).status == "finished"
    killed = validate(raw(tmp_path / "killed", eval_every=7))
    prepare_run_dir(killed)

    def kill(student, step):
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    assert build_loop(killed, evaluate=kill, log=lambda m: None).run().step == 7
    assert run_recipe(validate(raw(tmp_path / "killed")), log=lambda m: None).status == "finished"
    a, b = (checkpoint_dirs(tmp_path / d / "checkpoints")[-1] for d in ("ref", "killed"))
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert {"module.fake_score.safetensors", "module.discriminator.safetensors", "loss_state.safetensors",
            "optim.fake_score.safetensors", "optim.generator.safetensors"} <= set(names)
    for name in names:
        fa, fb = load_file(str(a / name)), load_file(str(b / name))
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), name
    assert not torch.equal(load_file(str(a / "loss_state.safetensors"))["ratio_mean"], torch.ones(4))


def test_discriminator_steps_with_every_fake_score_update_in_its_own_parameter_group(tmp_path):
    """DMD2 (main/train_sd.py) steps its classifier with the fake score on every guidance iteration: after
    two cycles of fake_updates 3 the discriminator has taken 6 optimizer steps (one per fake-score step, not one
    per generator step), at the rate optimizers.discriminator gives it, and the generator 2."""
    from fewstep.config import validate
    from fewstep.run import build_loop, prepare_run_dir

    recipe = validate({
        "name": "fd", "schedule": {"name": "vp"}, "teacher": {"kind": "mixture"},
        "student": {"kind": "mlp", "config": {"dim": 2, "hidden": 16, "depth": 2, "num_classes": 0}, "precondition": "edm"},
        "loss": {"name": "fdistill", "divergence": "jensen_shannon", "gan_weight": 0.01, "fake_updates": 3},
        "data": {"name": "mixture", "size": 200}, "optimizer": {"name": "AdamW", "lr": 0.001},
        "optimizers": {"fake_score": {"lr": 0.0005}, "discriminator": {"lr": 0.002, "betas": [0.5, 0.9]}},
        "sample": {"solver": "renoise", "spacing": "trailing", "steps": 1, "num": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 8, "batch_size": 8, "progress": False},
    })
    prepare_run_dir(recipe)
    loop = build_loop(recipe, log=lambda m: None)
    assert loop.run().step == 8
    assert loop.phase_steps == {"fake_score": 6, "generator": 2}
    opt = loop.optimizers["fake_score"]
    fake, disc = ({id(p) for p in m.parameters()} for m in (loop.loss.fake_score.net, loop.loss.discriminator))
    (g_fake,), (g_disc,) = ([g for g in opt.param_groups if {id(p) for p in g["params"]} == ids] for ids in (fake, disc))
    assert (g_fake["lr"], g_disc["lr"], tuple(g_disc["betas"])) == (0.0005, 0.002, (0.5, 0.9))
    assert all(int(opt.state[p]["step"]) == 6 for p in g_disc["params"])


def test_conditioning_timestep_399_generates_from_pure_noise_and_exports(tmp_path, tiny_dirs):
    """DMD2 SDXL's one-step generator (``--conditioning_timestep 399``, main/sd_unified_model.py): the UNet sees
    pure noise z at timestep 399 and x0 = (z - sqrt(1 - abar_399) eps_hat) / sqrt(abar_399), computed here from
    the UNet and diffusers' alphas_cumprod directly; exported, plain diffusers with timesteps=[399] gives
    fewstep's sample."""
    from diffusers import StableDiffusionPipeline

    from fewstep.build import build
    from fewstep.config import validate
    from fewstep.generate import Generator
    from fewstep.rng import SampleRNG

    recipe = validate({
        "name": "t", "teacher": {"kind": "pipeline", "path": str(tiny_dirs["sd"])},
        "student": {"kind": "pipeline", "init": "teacher"},
        "loss": {"name": "fdistill", "divergence": "reverse_kl", "guidance": 1.75, "timesteps": [399]},
        "data": {"name": "prompts"}, "sample": {"solver": "renoise", "steps": 1},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False},
    })
    b = build(recipe)
    cond = b.student.pipeline.encode_prompts(["a cat", "a dog"])
    size = b.student.denoiser.net.config.sample_size
    z = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = b.loss.generate(b.student.denoiser, z, cond, SampleRNG(torch.arange(2), "cpu"), grad=False)
        unet = b.student.pipeline.pipe.unet
        eps = unet(z, torch.tensor([399, 399]), encoder_hidden_states=cond["encoder_hidden_states"]).sample.double()
    abar = b.student.pipeline.pipe.scheduler.alphas_cumprod.double()[399]
    assert torch.allclose(x.double(), (z.double() - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-4)
    final = tmp_path / "final"
    b.export(b.student.denoiser, final)
    gen = Generator.load(str(final))
    assert gen.meta["sampler"]["timesteps"] == [399]
    ours = gen(1, seed=0, prompts=["a red bicycle"])
    pipe = StableDiffusionPipeline.from_pretrained(final)
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    theirs = pipe("a red bicycle", timesteps=[399], guidance_scale=1.0, latents=latents, output_type="pt").images * 2 - 1
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert "| sampler | renoise, 1 steps (timesteps [399]) |" in (final / "README.md").read_text()
    with pytest.raises(FewstepError, match="loss.timesteps has 2 values but loss.steps is 1"):
        build(validate({**recipe.raw, "loss": {**recipe.raw["loss"], "timesteps": [999, 399]}}))


def test_fake_score_copies_the_float32_teacher_weights_not_their_teacher_dtype_rounding(tmp_path, tiny_dirs):
    """DMD2 builds its fake UNet in float32 from the float32 weights; the teacher runs in train.teacher_dtype."""
    from diffusers import UNet2DConditionModel

    from fewstep.build import build
    from fewstep.config import validate

    b = build(validate({
        "name": "t", "teacher": {"kind": "pipeline", "path": str(tiny_dirs["sd"])},
        "student": {"kind": "pipeline", "init": "teacher"},
        "loss": {"name": "fdistill", "divergence": "reverse_kl", "guidance": 1.75}, "data": {"name": "prompts"},
        "sample": {"solver": "renoise", "steps": 1},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False, "teacher_dtype": "float16"},
    }))
    disk = UNet2DConditionModel.from_pretrained(tiny_dirs["sd"], subfolder="unet").state_dict()
    fake = b.loss.fake_score.net.state_dict()
    assert b.teacher.denoiser.net_dtype == torch.float16
    assert all(v.dtype == torch.float32 for v in fake.values())
    assert all(torch.equal(fake[k], disk[k]) for k in disk)
    assert not all(torch.equal(disk[k].half().float(), disk[k]) for k in disk)  # rounding would have changed them


def test_fake_target_x0_is_the_velocity_loss_weighted_by_s_squared_on_a_flow():
    """fake_target x0 (FastGen's fake_score_pred_type "x0", its FLUX.1 DMD2) against a hand computation from the
    networks' raw inputs and outputs: the generator's x = z - u_G (one step from s = 1), x_t = (1 - s) x + s eps, the
    fake score's u_f; native loss mean((u_f - (eps - x))^2), x0 loss mean((x_t - s u_f - x)^2) = mean(s^2 (...)^2)."""
    from fewstep.schedules import FlowSchedule

    sch = FlowSchedule()
    teacher = MixtureDenoiser(make_mixture("ring"), sch)
    batch = {"x0": make_mixture("ring").sample(64), "seeds": torch.arange(64)}
    for target in ("native", "x0"):
        torch.manual_seed(0)
        student = MLPDenoiser(MLPNet(dim=2, hidden=32, depth=2, num_classes=0), sch, "flow")
        loss = FDivergenceLoss.from_models(Models(teacher, student, sch, sample_shape=(2,)), divergence="reverse_kl",
                                           fake_target=target)
        seen = {}
        student.net.register_forward_hook(lambda m, i, o: seen.update(z=i[0], u_g=o))
        loss.fake_score.net.register_forward_hook(lambda m, i, o: seen.update(x_t=i[0], s=i[1], u_f=o))
        with torch.no_grad():
            got = float(loss("fake_score", batch, student, teacher).loss)
        x = seen["z"] - seen["u_g"]
        s = seen["s"][:, None]
        eps = (seen["x_t"] - (1 - s) * x) / s
        per_sample = ((seen["u_f"] - (eps - x)) ** 2).mean(1)
        expected = (s[:, 0] ** 2 * per_sample).mean() if target == "x0" else per_sample.mean()
        assert got == pytest.approx(float(expected), rel=1e-4)
        if target == "x0":
            assert got == pytest.approx(float(((seen["x_t"] - s * seen["u_f"] - x) ** 2).mean()), rel=1e-4)
            assert float(per_sample.mean()) > 1.5 * got  # the s^2 weighting is not a no-op
    with pytest.raises(FewstepError, match="unknown fake_target 'eps'; valid: native, x0"):
        FDivergenceLoss.from_models(Models(teacher, student, sch, sample_shape=(2,)), fake_target="eps")


def test_the_networks_a_loss_creates_start_from_the_run_seed_whatever_the_global_rng(tmp_path, tiny_dirs, captioned_dir):
    """A discriminator head (and any network a loss builds) draws its initial weights from train.seed: before, the
    global generator's state at build time decided them, and it differs between a 1-process and a 2-process launch,
    so an SD GAN run's discriminator started elsewhere on 2 DDP processes (0.26 apart after 2 steps; now 7e-8)."""
    from fewstep.build import build
    from fewstep.config import validate

    def disc(global_seed: int, run_seed: int = 0):
        raw = {"name": "t", "teacher": {"kind": "pipeline", "path": str(tiny_dirs["sd"])},
               "student": {"kind": "pipeline", "init": "teacher"},
               "loss": {"name": "fdistill", "divergence": "reverse_kl", "guidance": 1.5, "gan_weight": 0.01},
               "data": {"name": "images", "root": str(captioned_dir), "resolution": 32},
               "sample": {"solver": "renoise", "spacing": "trailing", "steps": 1},
               "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False, "seed": run_seed}}
        torch.manual_seed(global_seed)
        head = build(validate(raw)).loss.discriminator.head
        return torch.cat([p.detach().flatten() for p in head.parameters()])

    a, b, c = disc(1), disc(2), disc(1, run_seed=5)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_the_fake_score_trains_on_its_own_timesteps_and_the_generator_on_the_matching_ones():
    """DMD2 (main/sd_guidance.py): the fake UNet's denoising loss draws t from all of [0, T) while the
    distribution-matching loss draws from [0.02 T, 0.98 T]. fake_t_min/fake_t_max give the fake phase its own range;
    unset, both phases share t_min..t_max (FastGen). Checked on the t each phase hands its networks."""
    from fewstep.rng import SampleRNG

    loss = FDivergenceLoss(fake_score=torch.nn.Identity(), t_min=0.02, t_max=0.98, fake_t_min=0.0, fake_t_max=0.999)
    rng = SampleRNG(torch.arange(20000), torch.device("cpu"))
    fake, gen = loss._t_dm(rng, 1000, "fake_score"), loss._t_dm(rng, 1000, "generator")
    assert fake.min() == 0 and fake.max() == 999 and gen.min() == 20 and gen.max() == 980
    assert set(fake.long().tolist()) == set(range(1000)) and set(gen.long().tolist()) == set(range(20, 981))
    shared = FDivergenceLoss(fake_score=torch.nn.Identity(), t_min=0.001, t_max=0.999)
    assert (shared.fake_t_min, shared.fake_t_max) == (0.001, 0.999)
    with pytest.raises(FewstepError, match="need 0 <= fake_t_min < fake_t_max <= 1, got 0.5, 0.2"):
        FDivergenceLoss(fake_score=torch.nn.Identity(), fake_t_min=0.5, fake_t_max=0.2)
    # forward hands each phase's step the t of its own range
    seen = {}
    student = types.SimpleNamespace(net=torch.nn.Linear(1, 1), schedule=VPSchedule.from_betas(**SD), batch_cond=lambda b: None)
    loss.sample_shape = (2,)
    for phase in ("fake_score", "generator"):
        setattr(loss, f"{phase}_step", lambda batch, st, te, *, t, phase=phase, **kw: seen.setdefault(phase, t))
        loss.forward(phase, {"seeds": torch.arange(4000)}, student, None)
    assert seen["fake_score"].min() < 20 and seen["fake_score"].max() > 980
    assert seen["generator"].min() >= 20 and seen["generator"].max() <= 980
