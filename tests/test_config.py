"""Recipes (fewstep.config): one-line errors, every shipped recipe valid, and the train section as the loop's settings."""
import dataclasses

from fewstep.cli import main
from fewstep.config import TrainSection, available_recipes, validate
from fewstep.settings import LoopSettings
from tests.test_loop import mlp_recipe


def test_config_errors_are_one_line_exit_2(capsys, tmp_path):
    cases = [
        (["validate", "gmm_teacher", "train.max_stepz=3"], "unknown key train.max_stepz; valid: train.output_dir"),
        (["validate", "gmm_teacher", "train.max_steps=ten"], "train.max_steps: expected an integer, got 'ten'"),
        (["validate", "gmm_teacher", "train.max_steps=-1"], "train.max_steps must be at least 1"),
        (["validate", "gmm_teacher", "loss.name=reflowz"], "unknown loss 'reflowz'; valid: classifier, consistency, diffusion, fdistill, flow_distill, ode_regression, rcm, reflow, scm"),
        (["validate", "gmm_teacher", "loss.cond_drop=0.1"], "unknown key loss.cond_drop; valid: loss.cond_drop_prob"),
        (["validate", "gmm_teacher", "optimizer.name=Adamw"], "unknown optimizer 'Adamw'; valid:"),
        (["validate", "gmm_teacher", "sample.solver=rk4"], "unknown sample.solver 'rk4'"),
        (["validate", "gmm_teacher", "student.config.hiden=3"], "unknown key student.config.hiden; valid: student.config.dim"),
        (["validate", "gmm_teacher", "data.name=coco"], "unknown data 'coco'; valid: cache, digits"),
        (["validate", "gmm_teacher", "bogus=1"], "unknown key bogus; valid: name"),
        (["validate", "gmm_teacher", "train.mixed_precision=fp8"], "valid: no, fp16, bf16"),
        (["validate", "gmm_teacher", "lr_scheduler.name=sometimes"], "unknown lr_scheduler.name 'sometimes'"),
        # diffusers' get_scheduler("constant") ignores warmup_steps: refused rather than silently dropped
        (["validate", "gmm_teacher", "lr_scheduler.name=constant", "lr_scheduler.warmup_steps=500"],
         "lr_scheduler.warmup_steps 500 has no effect with name constant (diffusers' get_scheduler ignores it); "
         "use name constant_with_warmup, or warmup_steps 0"),
        (["validate", "no_such_recipe"], "recipe no_such_recipe not found; valid names:"),
        (["validate", "gmm_teacher", "train.max_steps"], "must look like key=value"),
        (["distill", "gmm_teacher", "train.batch_size=1.5"], "train.batch_size: expected an integer, got 1.5"),
        (["validate", "gmm_teacher", "student.kind=pipeline"], "student.kind=pipeline needs student.path"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)


def test_every_shipped_recipe_validates(capsys):
    recipes = available_recipes()
    assert {"digits_teacher", "gmm_teacher"} <= set(recipes)
    for name in recipes:
        assert main(["validate", name]) == 0, (name, capsys.readouterr().err)


def test_shipped_recipes_spell_out_the_required_train_keys():
    import yaml

    required = {"output_dir", "max_steps", "batch_size", "seed", "checkpoint_every", "resume"}
    for name, path in available_recipes().items():
        raw = yaml.safe_load(path.read_text())
        assert required <= set(raw.get("train", {})), (name, required - set(raw.get("train", {})))


def test_the_train_section_is_the_loops_settings_declared_once(tmp_path):
    """TrainSection extends LoopSettings (no field copied by name), and every loop field of a recipe reaches the
    loop as written: each set to a non-default value here comes back from the built loop's settings."""
    from fewstep.run import build_loop

    loop_fields = {f.name for f in dataclasses.fields(LoopSettings)}
    assert issubclass(TrainSection, LoopSettings) and loop_fields <= {f.name for f in dataclasses.fields(TrainSection)}
    changed = {"seed": 3, "checkpoint_every": 7, "keep_checkpoints": 4, "grad_accum": 2, "clip_grad_norm": 0.5,
               "ema_decay": 0.97, "ema_warmup": False, "export_ema": False, "log_every": 2, "sample_every": 5,
               "eval_every": 0, "max_wall_time": 60.0, "nonfinite": "skip", "num_workers": 0, "progress": False}
    recipe = validate(mlp_recipe(tmp_path / "run", **changed))
    got = build_loop(recipe, log=lambda m: None).settings
    assert type(got) is LoopSettings
    assert {k: getattr(got, k) for k in changed} == changed
    assert {f.name: getattr(got, f.name) for f in dataclasses.fields(LoopSettings)} == \
        {f.name: getattr(recipe.train, f.name) for f in dataclasses.fields(LoopSettings)}
