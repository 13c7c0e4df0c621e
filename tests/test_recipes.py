"""Every shipped recipe runs; the digits teacher's must-show is an opt-in slow test."""
import pytest
import torch

from fewstep.cli import main
from fewstep.config import available_recipes, load_recipe
from fewstep.testing.recipes import family_of
from fewstep.testing.tiny import TINY_RESOLUTION


SMOKE = ["train.max_steps=2", "train.batch_size=4", "train.progress=false", "train.sample_every=0", "sample.num=2",
         "sample.steps=2", "pairs.num=8", "pairs.shard_size=4", "pairs.batch_size=4", "pairs.steps=2"]


def smoke_args(name: str, out, tiny_dirs: dict, captioned_dir) -> list[str]:
    """``distill NAME`` with SMOKE sizes, against the tiny pipeline of the recipe's family when it has one: real
    captioned images at the tiny pipelines' size for every stage that reads images, random LPIPS weights for
    every stage that compares with LPIPS."""
    from fewstep.testing.recipes import standin_overrides
    from fewstep.testing.tiny import save_random_lpips

    tiny = standin_overrides(name, pipelines=tiny_dirs, images=captioned_dir, resolution=TINY_RESOLUTION,
                             lpips_weights=save_random_lpips(captioned_dir.parent / "lpips_vgg.safetensors"))
    return ["distill", name, f"train.output_dir={out}", *SMOKE, *tiny]


def finished(name: str, out) -> bool:
    """The recipe's last stage (or the run) finished and exported."""
    recipe = load_recipe(name)
    last = out / recipe.stages[-1]["name"] if recipe.stages else out
    return (last / "final" / "fewstep.json").exists() and (last / "DONE").exists()


def _sharded(name: str) -> bool:
    return load_recipe(name).train.parallel == "fsdp"


#: recipes whose smoke run (the same command, to the same finished export) the default suite makes under the device
#: check already (tests/testing/test_devices.py): three toy recipes and every SD-family recipe that does not shard
#: (the check runs those as one DDP process: another command); their plain run is opt-in
SMOKED_UNDER_DEVICE_CHECK = ("gmm_teacher", "digits_features", "gmm_cd") + tuple(
    n for n in sorted(available_recipes()) if family_of(n) and not _sharded(n))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SMOKED_UNDER_DEVICE_CHECK else n
                                  for n in sorted(available_recipes())])
def test_recipe_smoke_runs_two_steps(name, tmp_path, capsys, tiny_dirs, captioned_dir):
    out = tmp_path / name
    assert main(smoke_args(name, out, tiny_dirs, captioned_dir)) == 0
    assert finished(name, out)


def test_a_multi_stage_run_keeps_its_model_at_run_final(tmp_path, tiny_dirs, captioned_dir):
    """`fewstep distill gmm_reflow` then `fewstep sample --model RUN/final`: RUN/final points at the last stage's
    final/ (a relative symlink, so the run directory can move), and a rerun keeps it."""
    from safetensors.torch import load_file

    out = tmp_path / "gmm_reflow"
    assert main(smoke_args("gmm_reflow", out, tiny_dirs, captioned_dir)) == 0
    link = out / "final"
    assert link.is_symlink() and str(link.readlink()) == "distill/final"
    assert link.resolve() == (out / "distill" / "final").resolve()
    for model, name in ((link, "a"), (out / "distill" / "final", "b")):
        assert main(["sample", "--model", str(model), "--steps", "1", "--num", "4", "--seed", "0",
                     "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["samples"], load_file(str(tmp_path / "b.safetensors"))["samples"])
    assert main(smoke_args("gmm_reflow", out, tiny_dirs, captioned_dir)) == 0  # every stage skipped; the link stays
    assert link.is_symlink() and (link / "fewstep.json").is_file()


@pytest.mark.slow
def test_digits_teacher_draws_the_asked_class(tmp_path):
    """Must-show (about 6 minutes on 2 cores): >= 90% of 25-step guided samples classified as asked."""
    from fewstep.eval.digits_classifier import class_accuracy, fit_digits_classifier, sample_classes
    from fewstep.export import load_final

    out = tmp_path / "digits_teacher"
    assert main(["distill", "digits_teacher", f"train.output_dir={out}", "train.progress=false"]) == 0
    den, meta, _ = load_final(out / "final")
    with torch.no_grad():
        x, y = sample_classes(den, per_class=100, steps=25, guidance=meta["sampler"]["guidance"])
    acc, _ = class_accuracy(fit_digits_classifier(), x, y)
    assert acc >= 0.90, acc
    # and `fewstep bench` on it: the digits Fréchet distance falls as the steps rise
    import json

    assert main(["bench", "--teacher", str(out / "final"), "--num", "1000", "--repeats", "3", "--out", str(tmp_path / "bench")]) == 0
    fds = [r["fd"] for r in json.loads((tmp_path / "bench" / "report.json").read_text())["rows"]]
    assert all(a > b for a, b in zip(fds, fds[1:])), fds
