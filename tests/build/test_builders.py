"""The builders (fewstep.build): one construction entry point for every loss, phases and groups from its
settings, optimizers per phase, and the dry run's numbers from the protocol."""
import inspect
import re

import pytest

from fewstep.build import check_recipe
from fewstep.cli import main
from fewstep.config import load_recipe, validate
from fewstep.errors import FewstepError
from fewstep.losses import LOSSES


def test_dry_run_reports_parameters_and_memory(capsys, tmp_path):
    assert main(["distill", "digits_teacher", "--dry-run", f"train.output_dir={tmp_path / 'x'}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"student: [\d,]+ trainable, 0 frozen parameters", out)
    assert "memory estimate" in out and not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["sd15_lcm", "sd15_scm"])
def test_dry_run_of_a_guidance_embedding_student(name, tiny_dirs, captioned_dir, capsys, tmp_path):
    """student.guidance_embedding on --dry-run's weightless (meta) teacher: the widened copy stays weightless (it
    loaded the meta weights into a real UNet and crashed); it counts the teacher's parameters plus cond_proj's."""
    over = [f"teacher.path={tiny_dirs['sd']}", f"data.root={captioned_dir}", f"train.output_dir={tmp_path / 'x'}"]
    assert main(["distill", name, "--dry-run", *over]) == 0
    out = capsys.readouterr().out
    count = {k: int(a.replace(",", "")) + int(b.replace(",", ""))
             for k, a, b in re.findall(r"(student|teacher): ([\d,]+) trainable, ([\d,]+) frozen", out)}
    dim = load_recipe(name).raw["student"]["guidance_embedding"]
    from diffusers import UNet2DConditionModel

    width = UNet2DConditionModel.load_config(tiny_dirs["sd"] / "unet")["block_out_channels"][0]
    assert count["student"] == count["teacher"] + dim * width  # cond_proj: Linear(dim, width, bias=False)
    assert not (tmp_path / "x").exists()


def test_every_loss_keeps_its_defaults_once_in_its_signature():
    """``settings()`` is ``__init__``'s defaults (minus what from_models supplies): the builder, the checks and
    the loss read the same numbers; a supplied network is not a recipe key."""
    for name, cls in LOSSES.items():
        params = inspect.signature(cls.__init__).parameters
        expected = {n: p.default for n, p in params.items() if n != "self" and n not in cls.provided}
        assert cls.settings() == expected, name
        for key in cls.provided:
            raw = {**load_recipe("gmm_cd").raw, "loss": {"name": name, key: 1}}
            with pytest.raises(FewstepError, match=f"unknown key loss.{key}; valid"):
                check_recipe(validate(raw))


def test_loop_steps_count_student_updates_as_the_instance_runs_them():
    """The demo's step count (a classmethod of the settings) against the phases an instance runs, counted."""
    from fewstep.losses import ConsistencyDistillationLoss
    from fewstep.losses.base import Models
    from fewstep.schedules import VPSchedule
    from tests.losses.test_consistency import SD, _student
    from tests.losses.test_fdivergence import _setup

    for fake_updates in (1, 3):
        _, _, loss = _setup(fake_updates=fake_updates)
        for updates in (1, 2, 5):
            steps = type(loss).loop_steps(updates, fake_updates=fake_updates)
            phases = [loss.phase_for(i) for i in range(steps)]
            assert phases.count("generator") == updates and phases[-1] == "generator"
    cd = ConsistencyDistillationLoss.from_models(Models(None, _student(VPSchedule.from_betas(**SD))), solver="data",
                                                 adversarial_weight=0.1, discriminator_every=3)
    steps = type(cd).loop_steps(7, adversarial_weight=0.1, discriminator_every=3)
    assert [cd.phase_for(i) for i in range(steps)].count("student") == 7 and cd.phase_for(steps - 1) == "student"


def test_phases_a_recipe_may_configure_follow_the_loss_settings():
    """Plain CD runs one phase, so optimizers.discriminator is refused; with adversarial_weight it is accepted.
    f-distill's discriminator group may be configured whatever the divergence (an override may switch it)."""
    with pytest.raises(FewstepError, match="unknown optimizers.discriminator: loss consistency has phases student "):
        check_recipe(load_recipe("gmm_cd", ["optimizers.discriminator.lr=0.001"]))
    check_recipe(load_recipe("gmm_cd", ["loss.adversarial_weight=0.1", "optimizers.discriminator.lr=0.001"]))
    check_recipe(load_recipe("gmm_fdistill", ["loss.divergence=reverse_kl", "loss.gan_weight=0"]))


def test_each_phase_gets_an_optimizer_over_the_networks_it_trains():
    """f-distill with a discriminator: fake_score's optimizer holds the fake score's parameters and, as its own
    group with its own lr, the discriminator's; the generator's holds exactly the student's; each LR schedule
    runs over the steps its phase runs (2 fake-score steps and 1 generator step per cycle, 9 steps)."""
    from fewstep.build.optim import PhaseOptimizer, build_optimizers, phase_steps
    from tests.losses.test_fdivergence import _setup

    _, student, loss = _setup(fake_updates=2)
    networks = {"student": student.net, **loss.modules_to_train()}
    specs = {"default": PhaseOptimizer("AdamW", {"lr": 1e-3}),
             "fake_score": PhaseOptimizer("AdamW", {"lr": 1e-3}, groups={"discriminator": {"lr": 5e-4}})}
    opts, scheds = build_optimizers(loss, networks, specs, max_steps=9)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    fake_groups = opts["fake_score"].param_groups
    assert ids(fake_groups[0]["params"]) == ids(loss.fake_score.net.parameters()) and fake_groups[0]["lr"] == 1e-3
    assert ids(fake_groups[1]["params"]) == ids(loss.discriminator.parameters()) and fake_groups[1]["lr"] == 5e-4
    assert ids(p for g in opts["generator"].param_groups for p in g["params"]) == ids(student.net.parameters())
    assert phase_steps(loss, 9) == {"fake_score": 6, "generator": 3} and set(scheds) == {"fake_score", "generator"}
    with pytest.raises(FewstepError, match="unknown optimizer 'Adamw'"):
        build_optimizers(loss, networks, {"default": PhaseOptimizer("Adamw")}, max_steps=9)
