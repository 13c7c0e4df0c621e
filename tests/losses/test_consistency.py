"""Consistency distillation: boundary condition, one training step by hand, CFG convention, LCM grid,
guidance embedding, target network, adversarial phases, export to plain diffusers with LCMScheduler."""
import pytest
import torch

from fewstep.consistency import consistency_function
from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser, MLPDenoiser, MLPNet
from fewstep.errors import FewstepError
from fewstep.losses import ConsistencyDistillationLoss
from fewstep.losses.base import Models
from fewstep.schedules import FlowSchedule, VPSchedule, lcm_timesteps

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _student(schedule, seed=0, classes=8):
    torch.manual_seed(seed)
    net = MLPNet(dim=2, hidden=32, depth=2, num_classes=classes)
    if schedule.kind == "vp":
        return MLPDenoiser(net, schedule, precondition="edm")
    return MLPDenoiser(net, schedule, "flow")


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_boundary_condition_f_x_0_is_x(kind):
    sch = VPSchedule.from_betas(**SD) if kind == "vp" else FlowSchedule()
    den = _student(sch)
    x = torch.randn(16, 2) * 5
    assert torch.equal(consistency_function(den, x, 0.0), x)
    assert not torch.allclose(consistency_function(den, x, 500.0), x)


def _hand_target(kind, teacher, student, x0, labels, seeds, w_range):
    """The loss's target by hand: the skipping-step grid, two separate teacher forwards for CFG, one DDIM
    (= Euler on flow) step, then c_skip x + c_out x0_hat of the online student (target=online)."""
    g = [torch.Generator().manual_seed(int(s)) for s in seeds]
    eps = torch.stack([torch.randn(2, generator=gi) for gi in g])
    n = torch.stack([torch.randint(0, 50, (), generator=gi) for gi in g]).double()
    w = torch.stack([w_range[0] + (w_range[1] - w_range[0]) * torch.rand((), generator=gi) for gi in g])
    t = (n + 1) * 20 - 1
    s = (t - 20).clamp_min(0)
    sch = teacher.schedule
    a_t, s_t = (v.float()[:, None] for v in sch.alpha_sigma(t))
    a_s, s_s = (v.float()[:, None] for v in sch.alpha_sigma(s))
    x_t = a_t * x0 + s_t * eps
    null = torch.full_like(labels, 8)
    x0_u = teacher(x_t, t, {"class_labels": null})
    x0_c = teacher(x_t, t, {"class_labels": labels})
    x0_g = x0_u + w[:, None] * (x0_c - x0_u)  # diffusers' convention: w = 1 is the conditional prediction
    eps_g = (x_t - a_t * x0_g) / s_t
    x_s = a_s * x0_g + s_s * eps_g

    def f(x, tt):
        sc = (tt.clamp_min(0) * 10).float()[:, None]
        return 0.25 / (sc**2 + 0.25) * x + sc / (sc**2 + 0.25).sqrt() * student(x, tt, {"class_labels": labels})

    with torch.no_grad():
        target = f(x_s, s)
    return f(x_t, t), target


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_one_training_step_equals_hand_computed_ddim_step_and_target(kind):
    sch = VPSchedule.from_betas(**SD) if kind == "vp" else FlowSchedule()
    teacher = MixtureDenoiser(make_mixture("ring"), sch)
    student = _student(sch)
    x0 = make_mixture("ring").sample(12, torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 8
    seeds = torch.arange(12) * 7 + 3
    loss_fn = ConsistencyDistillationLoss(student=student, target="online", guidance_min=1.5, guidance_max=4.0,
                                          solver="ddim" if kind == "vp" else "euler")
    out = loss_fn("student", {"x0": x0, "class_labels": labels, "seeds": seeds}, student, teacher)
    f_theta, target = _hand_target(kind, teacher, student, x0, labels, seeds, (1.5, 4.0))
    assert torch.allclose(out.loss, ((f_theta - target) ** 2).mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_consistency_training_step_uses_the_data_point_with_the_same_noise(kind):
    """solver: data (consistency training): x_s = alpha_s x0 + sigma_s eps with x_t's eps, no teacher."""
    sch = VPSchedule.from_betas(**SD) if kind == "vp" else FlowSchedule()
    student = _student(sch)
    x0 = make_mixture("ring").sample(12, torch.Generator().manual_seed(1))
    labels, seeds = torch.arange(12) % 8, torch.arange(12) * 7 + 3
    loss_fn = ConsistencyDistillationLoss.from_models(Models(None, student), solver="data", target="online")
    out = loss_fn("student", {"x0": x0, "class_labels": labels, "seeds": seeds}, student, None)
    g = [torch.Generator().manual_seed(int(s)) for s in seeds]
    eps = torch.stack([torch.randn(2, generator=gi) for gi in g])
    t = (torch.stack([torch.randint(0, 50, (), generator=gi) for gi in g]).double() + 1) * 20 - 1
    s = (t - 20).clamp_min(0)
    a_t, s_t = (v.float()[:, None] for v in sch.alpha_sigma(t))
    a_s, s_s = (v.float()[:, None] for v in sch.alpha_sigma(s))
    cond = {"class_labels": labels}
    with torch.no_grad():
        f_t = consistency_function(student, a_t * x0 + s_t * eps, t, cond)
        f_s = consistency_function(student, a_s * x0 + s_s * eps, s, cond)
    assert torch.allclose(out.loss, ((f_t - f_s) ** 2).mean(), rtol=1e-4, atol=1e-7)
    with pytest.raises(FewstepError, match="only solver: data"):
        ConsistencyDistillationLoss.from_models(Models(None, student), solver="ddim")


def test_ema_target_network_updates_and_checkpoints():
    sch = VPSchedule.from_betas(**SD)
    student = _student(sch)
    loss_fn = ConsistencyDistillationLoss(student=student, target="ema", target_decay=0.9)
    before = {k: v.clone() for k, v in loss_fn.extra_state().items()}
    with torch.no_grad():
        for p in student.net.parameters():
            p.add_(1.0)
    loss_fn.on_step_end("student", student)
    after = loss_fn.extra_state()
    for k, v in before.items():
        assert torch.allclose(after[k], v + 0.1, atol=1e-6)  # target <- 0.9 target + 0.1 student
    fresh = ConsistencyDistillationLoss(student=_student(sch, seed=5), target="ema")
    fresh.load_extra_state(after)
    assert all(torch.equal(fresh.extra_state()[k], after[k]) for k in after)


def test_lcm_timesteps_match_diffusers():
    from diffusers import LCMScheduler

    for n in (1, 2, 3, 4, 8):
        sched = LCMScheduler()
        sched.set_timesteps(n)
        assert lcm_timesteps(n).tolist() == sched.timesteps.tolist()


def test_adversarial_variant_alternates_phases_and_trains_the_discriminator():
    from fewstep.discriminators import XTDiscriminator

    sch = VPSchedule.from_betas(**SD)
    teacher = MixtureDenoiser(make_mixture("ring"), sch)
    student = _student(sch)
    loss_fn = ConsistencyDistillationLoss(student=student, adversarial_weight=0.1, gan_loss="non_saturating",
                                          discriminator=XTDiscriminator.for_denoiser(student))
    assert loss_fn.phases == ("student", "discriminator")
    assert [loss_fn.phase_for(i) for i in range(4)] == ["student", "discriminator", "student", "discriminator"]
    batch = {"x0": torch.randn(8, 2), "class_labels": torch.arange(8), "seeds": torch.arange(8)}
    out = loss_fn("discriminator", batch, student, teacher)
    out.loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert all(p.grad is None for p in student.net.parameters())
    out = loss_fn("student", batch, student, teacher)
    assert "gan_generator" in out.logs


def test_bad_options_are_refused():
    sch = VPSchedule.from_betas(**SD)
    with pytest.raises(FewstepError, match="eta > 0 needs solver ddim"):
        ConsistencyDistillationLoss(student=_student(sch), eta=0.5, solver="euler")
    with pytest.raises(FewstepError, match="valid: ema, online"):
        ConsistencyDistillationLoss(student=_student(sch), target="polyak")
    with pytest.raises(FewstepError, match="adversarial_weight > 0 needs a discriminator"):
        ConsistencyDistillationLoss(student=_student(sch), adversarial_weight=1.0)


def test_stochastic_teacher_step_is_ddim_with_eta():
    """eta > 0: the teacher step is DDIM(eta) with per-sample noise; eta = 0 gives the deterministic step."""
    from fewstep.solvers import ddim_update

    sch = VPSchedule.from_betas(**SD)
    teacher = MixtureDenoiser(make_mixture("ring"), sch)
    x0, eps, z = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2)
    t, s = torch.full((4,), 499.0, dtype=torch.float64), torch.full((4,), 479.0, dtype=torch.float64)
    x_t = sch.add_noise(x0, eps, t)
    x0_hat, eps_hat = teacher.predict(x_t, t)
    det = ddim_update(sch, x0_hat, eps_hat, t, s)
    sto = ddim_update(sch, x0_hat, eps_hat, t, s, eta=1.0, z=z)
    a, sg = (v.float()[:, None] for v in sch.alpha_sigma(t))
    a2, sg2 = (v.float()[:, None] for v in sch.alpha_sigma(s))
    s_eta = (sg2**2 / sg**2 * (1 - a**2 / a2**2)).sqrt()  # Song et al. 2021, eq. 16 with eta = 1
    assert torch.allclose(sto, a2 * x0_hat + (sg2**2 - s_eta**2).sqrt() * eps_hat + s_eta * z, atol=1e-6)
    assert torch.allclose(det, a2 * x0_hat + sg2 * eps_hat, atol=1e-6)


def test_guidance_embedding_student_starts_equal_to_teacher_and_exports_to_lcm_pipeline(tmp_path, tiny_dirs, captioned_dir, plain_one_step):
    from diffusers import LCMScheduler

    from fewstep.build import build
    from fewstep.config import validate
    from fewstep.generate import Generator

    recipe = validate({
        "name": "t", "teacher": {"kind": "pipeline", "path": str(tiny_dirs["sd"])},
        "student": {"kind": "pipeline", "init": "teacher", "guidance_embedding": 256},
        "loss": {"name": "consistency", "guidance_min": 2.0, "guidance_max": 8.0},
        "data": {"name": "images", "root": str(captioned_dir), "resolution": 32}, "sample": {"solver": "consistency", "steps": 1, "spacing": "lcm", "guidance": 6.0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False},
    })
    b = build(recipe)
    student, teacher = b.student.denoiser, b.teacher.denoiser
    assert student.guidance_embedding_dim == 256 and student.net.config.time_cond_proj_dim == 256
    cond = b.teacher.pipeline.encode_prompts(["a cat", "a dog"])
    x = torch.randn(2, 4, student.net.config.sample_size, student.net.config.sample_size)
    with torch.no_grad():
        assert torch.allclose(student.native(x, 500.0, cond, guidance=5.0), teacher.native(x, 500.0, cond), atol=1e-5)
    final = tmp_path / "final"
    b.export(student, final)
    ours = Generator.load(str(final))(1, seed=0, prompts=["a red bicycle"])
    pipe, image = plain_one_step(final, "a red bicycle", 6.0)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert torch.allclose(ours, image, atol=1e-4)
    four = pipe("a red bicycle", num_inference_steps=4, guidance_scale=6.0, output_type="pt").images
    assert torch.isfinite(four).all()
    # and one training step runs on encoded images and prompts
    batch = b.prepare({**b.dataset[0], "x0": b.dataset[0]["x0"][None], "prompt": [b.dataset[0]["prompt"]], "seeds": torch.arange(1)})
    assert torch.isfinite(b.loss("student", batch, student, teacher).loss)


def test_adversarial_cd_recipe_trains_its_discriminator_with_its_own_optimizer(tmp_path):
    """recipes/gmm_acd.yaml: `optimizers.discriminator` of adversarial CD is accepted (it was refused: the
    check read the phases of a plain CD loss), built as asked and checkpointed; an unknown phase is refused."""
    import json

    from safetensors.torch import load_file

    from fewstep.build import check_recipe
    from fewstep.cli import main
    from fewstep.config import load_recipe
    from fewstep.errors import FewstepError

    check_recipe(load_recipe("gmm_cd", ["loss.adversarial_weight=0.1", "optimizers.discriminator.lr=0.001"]))
    with pytest.raises(FewstepError, match="unknown optimizers.critic: loss consistency has phases student, discriminator"):
        check_recipe(load_recipe("gmm_cd", ["loss.adversarial_weight=0.1", "optimizers.critic.lr=0.001"]))
    out = tmp_path / "acd"
    assert main(["distill", "gmm_acd", f"train.output_dir={out}", "train.max_steps=4", "train.progress=false",
                 "train.batch_size=64", "sample.num=8"]) == 0
    ckpt = out / "cd" / "checkpoints" / "step-00000004"
    state = json.loads((ckpt / "state.json").read_text())["state"]
    assert state["phase_steps"] == {"student": 2, "discriminator": 2}
    groups = state["skeletons"]["optim.discriminator"]
    assert "0.5" in json.dumps(groups) and "0.0002" in json.dumps(groups)  # betas (0.5, 0.999), lr 2e-4
    assert load_file(str(ckpt / "module.discriminator.safetensors"))


def test_the_phases_a_loss_runs_are_among_those_a_recipe_may_configure():
    """check_recipe accepts ``optimizers.PHASE`` for every phase of the loss class; each instance runs a subset."""
    from fewstep.losses import LOSSES

    for cls in LOSSES.values():
        assert set(cls.phases_for()) <= set(cls.phases), cls
    assert ConsistencyDistillationLoss.phases_for(adversarial_weight=0.1) == ("student", "discriminator")
    from fewstep.losses.fdivergence import WEIGHTINGS, FDivergenceLoss

    for divergence in WEIGHTINGS:
        for gan_weight in (0.0, 1e-3):
            assert set(FDivergenceLoss.phases_for(divergence=divergence, gan_weight=gan_weight)) <= set(FDivergenceLoss.phases)


def test_non_default_consistency_settings_reach_the_sampler_and_the_lcm_export(tmp_path, tiny_dirs, captioned_dir):
    """timestep_scaling 0.01 (c_skip ~ 0.02 at t = 339, not ~1e-8) and N = 20 (3 lcm steps: 999, 699, 349, not
    999, 679, 339): plain diffusers' LCMScheduler, loaded from the export, reproduces fewstep's own 3-step
    sample; the default settings would not."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fewstep.build import build
    from fewstep.config import validate
    from fewstep.generate import Generator

    def recipe(**loss):
        return validate({
            "name": "t", "teacher": {"kind": "pipeline", "path": str(tiny_dirs["sd"])},
            "student": {"kind": "pipeline", "init": "teacher"},
            "loss": {"name": "consistency", "num_timesteps": 20, "timestep_scaling": 0.01, **loss},
            "data": {"name": "images", "root": str(captioned_dir), "resolution": 32},
            "sample": {"solver": "consistency", "steps": 3, "spacing": "lcm"},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False},
        })

    b = build(recipe())
    final = tmp_path / "final"
    b.export(b.student.denoiser, final)
    gen = Generator.load(str(final))
    assert gen.meta["sampler"]["timestep_scaling"] == 0.01 and gen.meta["sampler"]["original_steps"] == 20
    ours = gen(1, seed=0, prompts=["a red bicycle"])
    pipe = StableDiffusionPipeline.from_pretrained(final)
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.scheduler.set_timesteps(3)
    assert pipe.scheduler.timesteps.tolist() == [999, 699, 349]
    size = pipe.unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))

    def plain(p):  # the consistency sampler's re-noising draws from seed + 1, as the pipeline's generator here
        return p("a red bicycle", num_inference_steps=3, guidance_scale=1.0, latents=latents, output_type="pt",
                 generator=torch.Generator().manual_seed(1)).images * 2 - 1

    theirs = plain(pipe)
    assert torch.allclose(ours, theirs, atol=1e-4)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=10.0, original_inference_steps=50)
    assert (plain(pipe) - ours).abs().max() > 1e-2  # the defaults sample another model: the check can fail
    # LCMScheduler fixes sigma_data at 0.5: another value is refused before training, in one line
    with pytest.raises(FewstepError, match="sigma_data 0.7: a pipeline student exports with diffusers' LCMScheduler"):
        build(recipe(sigma_data=0.7))
