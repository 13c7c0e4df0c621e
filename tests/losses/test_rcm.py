"""rCM (sCM + DMD's score regularizer): the generator loss against sCM's loss plus DMD's written out by hand from
its own seed stream, the phases and what each trains, nested settings refused with their valid names, and a
killed run resumed bit-exactly (student, adaptive weight, fake score, both optimizers, the warm-up counter)."""
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fewstep.build.checks import check_recipe
from fewstep.checkpoint import checkpoint_dirs
from fewstep.config import validate
from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser, MLPDenoiser, MLPNet
from fewstep.errors import FewstepError
from fewstep.losses import RCMLoss, SCMLoss
from fewstep.losses.base import Models
from fewstep.rng import sample_seed
from fewstep.run import build_loop, prepare_run_dir, run_recipe
from fewstep.schedules import VPSchedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _alpha_bar():
    """SD 1.5's scaled_linear alphas_cumprod, by hand."""
    return torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)


def _dmd_draws(seeds):
    """(z, eps, t) of the DMD term, drawn by hand from each sample's second stream in f-distill's order: the generator's
    noise, the re-noising noise, t ~ U{20..980} (t_min 0.02, t_max 0.98 of 1000)."""
    gens = [torch.Generator().manual_seed(sample_seed(int(s), 1)) for s in seeds]
    z = torch.stack([torch.randn(2, generator=g) for g in gens])
    eps = torch.stack([torch.randn(2, generator=g) for g in gens])
    return z, eps, torch.stack([torch.randint(20, 981, (), generator=g) for g in gens]).double()


def _models():
    sch = VPSchedule.from_betas(**SD)
    torch.manual_seed(0)
    student = MLPDenoiser(MLPNet(dim=2, hidden=32, depth=2, num_classes=0), sch, precondition="edm")
    return Models(teacher=MixtureDenoiser(make_mixture("ring"), sch), student=student, schedule=sch, sample_shape=(2,))


def test_generator_loss_is_scm_plus_weighted_dmd_from_its_own_seeds():
    """L = L_sCM + lambda L_DMD: sCM's loss on the batch as loss scm computes it (tested against Algorithm 1 in
    losses/test_scm.py), and DMD's written out here from each sample's second seed stream: z, eps, t ~ U{20..980},
    x = G(z) at t = 999, grad = (x0_fake - x0_real) / mean|x - x0_real|, 0.5 mean(grad^2); its gradient in x is
    grad / numel. The DMD noise is not sCM's (the first normal of both streams differs)."""
    models = _models()
    scm_settings = {"tangent_warmup_steps": 4}
    loss = RCMLoss.from_models(models, dmd_weight=0.7, scm=scm_settings, dmd={"fake_updates": 2, "fake_init": "student"})
    student, teacher = models.student, models.teacher
    seeds = torch.arange(8) + 300
    x0 = make_mixture("ring").sample(8, torch.Generator().manual_seed(0))
    batch = {"x0": x0, "seeds": seeds}
    out = loss("generator", batch, student, teacher)

    scm_alone = SCMLoss.from_models(models, **scm_settings)  # its weighting starts at 0, as rCM's does
    expected_scm = scm_alone("student", batch, student, teacher).loss.detach()
    z, eps, t = _dmd_draws(seeds)
    with torch.no_grad():
        x = student(z, torch.full((8,), 999.0, dtype=torch.float64))
        ab = _alpha_bar()[t.long()].float()[:, None]
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps
        x0_real, x0_fake = teacher(x_t, t), loss.dmd.fake_score(x_t, t)
        grad = (x0_fake - x0_real) / (x - x0_real).abs().mean(1, keepdim=True)
    expected_dmd = 0.5 * grad.square().mean()
    assert float(out.logs["scm_loss"]) == pytest.approx(float(expected_scm), rel=1e-6)
    assert float(out.logs["dmd_dm_loss"]) == pytest.approx(float(expected_dmd), rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(float(expected_scm) + 0.7 * float(expected_dmd), rel=1e-5)
    first_normals = torch.stack([torch.randn((), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    assert not torch.allclose(first_normals, z[:, 0])

    # the gradient: sCM's plus 0.7 x DMD's (grad / numel through G)
    out.loss.backward()
    got = [p.grad.clone() for p in student.net.parameters()]
    student.net.zero_grad(set_to_none=True)
    scm_alone("student", batch, student, teacher).loss.backward()
    x = student(z, torch.full((8,), 999.0, dtype=torch.float64))
    (0.7 * (grad * x).sum() / x.numel()).backward()
    for a, b in zip(got, (p.grad for p in student.net.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_phases_and_what_each_trains():
    models = _models()
    loss = RCMLoss.from_models(models, dmd={"fake_updates": 3, "fake_init": "student"})
    assert [loss.phase_for(i) for i in range(8)] == ["fake_score"] * 3 + ["generator"] + ["fake_score"] * 3 + ["generator"]
    assert RCMLoss.loop_steps(2, dmd={"fake_updates": 3}) == 8
    assert loss.trains() == {"weighting": "scm.weighting", "fake_score": "dmd.fake_score.net"}
    assert loss.phase_modules("generator") == ("student", "weighting")
    assert loss.phase_modules("fake_score") == ("fake_score",)
    assert loss.sampler_settings() == loss.scm.sampler_settings()
    batch = {"x0": make_mixture("ring").sample(8), "seeds": torch.arange(8)}
    out = loss("fake_score", batch, models.student, models.teacher)
    out.loss.backward()
    assert all(p.grad is not None for p in loss.dmd.fake_score.net.parameters())
    assert all(p.grad is None for p in models.student.net.parameters())
    # the tangent warm-up counts student updates only
    loss.on_step_end("fake_score", models.student)
    loss.on_step_end("generator", models.student)
    assert loss.extra_state() == {"scm.iteration": torch.tensor(1)}


@pytest.mark.parametrize("settings, message", [
    ({"dmd_weight": 0.0}, "dmd_weight must be > 0"),
    ({"scm": {"p_men": -1.0}}, "unknown key loss.scm.p_men; valid: loss.scm.sigma_data, loss.scm.p_mean"),
    ({"scm": {"tangent_norm": "l1"}}, "unknown loss.scm.tangent_norm 'l1'; valid: rms, full"),
    ({"dmd": {"fake_init": "teacher"}}, "unknown fake_init"),
    ({"dmd": {"fake_updatez": 2}}, "unknown key loss.dmd.fake_updatez; valid: loss.dmd.divergence"),
])
def test_bad_settings_are_refused_with_the_valid_names(settings, message):
    with pytest.raises(FewstepError, match=message):
        RCMLoss.from_models(_models(), **settings)
    if "fake_init" not in str(settings):  # a network-dependent check: the recipe check cannot know the teacher
        with pytest.raises(FewstepError, match=message):
            check_recipe(validate(_raw("/nonexistent", 3, **settings)))


def _raw(out, max_steps, **loss):
    return {
        "name": "tiny_rcm", "schedule": {"name": "vp", **SD},
        "teacher": {"kind": "mixture", "mixture": {"name": "ring"}},
        "student": {"kind": "mlp", "config": {"dim": 2, "hidden": 16, "depth": 2, "num_classes": 0}, "precondition": "edm"},
        "loss": {"name": "rcm", "scm": {"tangent_warmup_steps": 4}, "dmd": {"fake_updates": 2, "fake_init": "student"},
                 **loss},
        "data": {"name": "mixture", "size": 500}, "optimizer": {"name": "AdamW", "lr": 0.001},
        "optimizers": {"weighting": {"lr": 0.01}, "fake_score": {"lr": 0.002}},
        "sample": {"solver": "renoise", "spacing": "trigflow", "steps": 1, "num": 8},
        "train": {"output_dir": str(out), "max_steps": max_steps, "batch_size": 16, "checkpoint_every": 5,
                  "progress": False, "ema_decay": 0.9},
    }


def test_resume_is_bit_exact_with_weighting_fake_score_and_their_optimizers(tmp_path):
    """Killed mid-cycle (step 7 of 12, a fake-score step) and resumed: every checkpointed group bit-identical to an
    uninterrupted run's."""
    assert run_recipe(validate(_raw(tmp_path / "ref", 12)), log=lambda m: None).status == "finished"
    killed = validate(_raw(tmp_path / "killed", 12))
    killed.train.eval_every = 7
    prepare_run_dir(killed)

    def kill(student, step):
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    assert build_loop(killed, evaluate=kill, log=lambda m: None).run().step == 7
    assert run_recipe(validate(_raw(tmp_path / "killed", 12)), log=lambda m: None).status == "finished"
    a, b = (checkpoint_dirs(tmp_path / d / "checkpoints")[-1] for d in ("ref", "killed"))
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert {"student.safetensors", "module.weighting.safetensors", "module.fake_score.safetensors",
            "optim.generator.safetensors", "optim.fake_score.safetensors", "loss_state.safetensors"} <= set(names)
    for name in names:
        fa, fb = load_file(str(a / name)), load_file(str(b / name))
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), name
    assert int(load_file(str(a / "loss_state.safetensors"))["scm.iteration"]) == 4  # 12 steps, 4 student updates
    assert float(load_file(str(a / "module.weighting.safetensors"))["linear.bias"].abs()) > 0


def test_fake_score_phase_by_hand():
    """The fake-score phase is f-distill's: the denoising loss on G's detached samples drawn from the DMD stream (the
    EDM MLP's native output is x0_hat, so the target is the sample itself)."""
    models = _models()
    loss = RCMLoss.from_models(models, dmd={"fake_init": "student"})
    seeds = torch.arange(4) + 7
    out = loss("fake_score", {"x0": make_mixture("ring").sample(4), "seeds": seeds}, models.student, models.teacher)
    z, eps, t = _dmd_draws(seeds)
    with torch.no_grad():
        x = models.student(z, torch.full((4,), 999.0, dtype=torch.float64))
        ab = _alpha_bar()[t.long()].float()[:, None]
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps
        expected = F.mse_loss(loss.dmd.fake_score.native(x_t, t), x)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_the_scm_term_sees_the_teacher_without_the_fake_scores_adapters(tmp_path, tiny_dirs, captioned_dir):
    """fake_init teacher_lora puts the fake score's adapters on the teacher's network; the sCM term's teacher velocity
    must come from the teacher itself. With the adapters made nonzero, rCM's sCM term equals loss scm's on a clean
    load of the same teacher, and differs from loss scm's on the adapter-carrying network (what the term would be
    without the switch)."""
    from fewstep.build import build

    def raw(loss):
        return {"name": "t", "teacher": {"kind": "pipeline", "path": str(tiny_dirs["sd"])},
                "student": {"kind": "pipeline", "init": "teacher"}, "loss": loss,
                "data": {"name": "images", "root": str(captioned_dir), "resolution": 32},
                "sample": {"solver": "renoise", "spacing": "trigflow", "steps": 1},
                "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False}}

    scm = {"guidance_min": 2.0, "guidance_max": 2.0, "tangent_warmup_steps": 1}
    run = build(validate(raw({"name": "rcm", "scm": scm, "dmd": {"guidance": 2.0, "fake_init": "teacher_lora",
                                                               "fake_lora_rank": 4}})))
    clean = build(validate(raw({"name": "scm", **scm})))
    teacher, student = run.teacher.denoiser, run.student.denoiser
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in teacher.net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    net = student.net
    dim = net.config.cross_attention_dim
    batch = {"x0": torch.randn(2, 4, 16, 16), "seeds": torch.tensor([5, 6]),
             "encoder_hidden_states": torch.randn(2, 77, dim)}  # CFG's null condition is the teacher's own
    ours = float(run.loss("generator", batch, student, teacher).logs["scm_loss"])
    reference = float(clean.loss("student", batch, clean.student.denoiser, clean.teacher.denoiser).loss.detach())
    with_adapters = float(clean.loss("student", batch, student, teacher).loss.detach())
    assert ours == pytest.approx(reference, rel=1e-5)
    assert abs(with_adapters - reference) > 1e-3 * abs(reference)
