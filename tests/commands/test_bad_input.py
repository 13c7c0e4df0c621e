"""Bad input to `fewstep distill` and the other verbs, in-process: each case gives exactly one line on
stderr naming the problem, exit code 2, and leaves the output directory as it was (absent, or
untouched). tests/test_loop.py covers the plain recipe-key errors."""
import pytest
from PIL import Image

from fewstep.cli import main


def _images(root, mode="RGB", size=32, extra=None):
    root.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size)).save(root / ("a.jpg" if mode == "CMYK" else "a.png"))
    (root / "a.txt").write_text("a digit")
    if extra:
        (root / extra).write_text("not an image")
    return root


def _cases(tmp, tiny):
    sd = str(tiny["sd"])
    out = f"train.output_dir={tmp / 'out'}"
    empty = tmp / "empty.txt"
    empty.write_text("\n  \n")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("name: x\nloss: [unclosed\n")
    gray = _images(tmp / "gray", mode="CMYK")
    junk = _images(tmp / "junk", extra="notes.pdf")
    small = _images(tmp / "small", size=20)
    return [
        (["distill", "sd15_dmd", out, "data.min_prompts=0", "teacher.path=/no/such/model"], "model path /no/such/model does not exist"),
        (["distill", "sd15_dmd", out, "data.min_prompts=0", "teacher.path=someorg/somemodel"], "HF_HUB_OFFLINE=1 forbids downloading it"),
        (["distill", "sd15_dmd", out, "data.min_prompts=0", f"teacher.path={tmp}"], "is not a diffusers model directory"),
        (["distill", "sd15_dmd", out, "data.min_prompts=0", f"teacher.path={sd}", f"data.path={empty}"], "no prompts"),
        (["distill", "sd15_dmd", out, "data.min_prompts=0", f"teacher.path={sd}", "data.path=/no/prompts.txt"], "/no/prompts.txt"),
        (["distill", "sd15_lcm_lora", out, f"teacher.path={sd}", f"data.root={gray}", "data.resolution=32"],
         "unsupported image mode CMYK"),
        (["distill", "sd15_lcm_lora", out, f"teacher.path={sd}", f"data.root={junk}", "data.resolution=32"],
         "notes.pdf is not an image"),
        (["distill", "sd15_lcm_lora", out, f"teacher.path={sd}", f"data.root={tmp / 'none'}"], "does not exist"),
        (["distill", "sd15_lcm_lora", out, f"teacher.path={sd}", f"data.root={small}", "data.resolution=32", "data.resize=false"],
         "size 20x20 but 32x32 is required"),
        (["distill", "gmm_teacher", out, "train.max_steps=-5"], "train.max_steps must be at least 1"),
        (["distill", "gmm_teacher", out, "train.max_step=10"], "unknown key train.max_step"),
        (["distill", "gmm_teacher", out, "train.batch_size=many"], "train.batch_size"),
        (["distill", "sd15_lcm_lora", out, f"teacher.path={sd}", "lora.target_modules=[to_qq]"],
         "LoRA target module 'to_qq' matches no layer"),
        (["distill", "sd15_lcm_lora", out, f"teacher.path={sd}", "lora.rank=0"], "lora.rank must be at least 1"),
        (["distill", "gmm_fdistill", out, "loss.divergence=jensen-shannon"], "unknown divergence 'jensen-shannon'; valid:"),
        (["distill", "gmm_fdistill", out, "loss.fake_init=copy"], "unknown fake_init 'copy'"),
        (["distill", "sd15_dmd", out, "data.min_prompts=0", f"teacher.path={sd}", "loss.divergence=forward_kl"], "needs gan_weight > 0"),
        (["distill", "sd15_lcm", out, f"teacher.path={sd}", "loss.guidance_min=5", "loss.guidance_max=2"],
         "exceeds guidance_max"),
        (["distill", "gmm_cd", out, "loss.solver=rk4"], "unknown solver 'rk4'"),
        (["distill", "sd15_fdistill_js", out, f"teacher.path={sd}", "train.teacher_dtype=float16"],
         "train.teacher_dtype float16 where a trained gradient crosses the frozen teacher"),  # benchmarks/precision.py
        (["distill", "sd15_fdistill_lora", out, f"teacher.path={sd}", "train.teacher_dtype=float16",
          "loss.divergence=reverse_kl", "loss.gan_weight=0"], "or loss.fake_init teacher_lora): in float16"),
        (["distill", "sd15_lcm", out, "teacher.kind=none"], "needs a teacher"),
        (["distill", "digits_teacher", out, "data.classes=[11]"], "unknown digit class(es) [11]; valid: 0..9"),
        (["distill", "gmm_teacher", out, "sample.steps=0"], "sample.steps and sample.num must be at least 1"),
        (["distill", "gmm_teacher", out, "student.path=stage:nope", "student.kind=pretrained"], "no earlier stage named 'nope'"),
        (["distill", str(bad_yaml)], "bad.yaml"),
        (["distill", "gmm_teacher", f"train.output_dir={empty}/x"], "is not a directory"),
        (["distill", "gmm_teacher", out, "optimizer.lr=-1"], "AdamW refuses {'lr': -1.0}: Invalid learning rate"),
        (["distill", "gmm_reflow", out, "optimizer.lr=-1"], "Invalid learning rate"),  # before its first stage
        (["distill", "gmm_teacher", out, "optimizer.betas=[0.9,1.5]"], "Invalid beta parameter"),
        (["distill", "gmm_teacher", out, "lr_scheduler.warmup_steps=-5"], "lr_scheduler.warmup_steps must be >= 0"),
        (["sample", "--model", str(tmp / "nomodel"), "--num", "2", "--out", str(tmp / "s.png")], "not a fewstep model directory"),
        (["sample", "--model", "fewstep/assets/digits_teacher", "--num", "2", "--steps", "0", "--out", str(tmp / "s.png")],
         "at least 1"),
        (["sample", "--model", "fewstep/assets/digits_teacher", "--num", "2", "--class", "12", "--out", str(tmp / "s.png")],
         "class must be in 0..9"),
        (["eval", "--model", "fewstep/assets/digits_teacher", "--num", "4", "--reference", "digits:1,x"], "digits:C,C"),
        (["lora", "fuse", "fewstep/assets/digits_teacher", "--out", str(tmp / "fused")], "not a LoRA"),
        (["pairs", "gmm_teacher", out], "pairs"),
        (["demo", "--updates", "-3", "--out", str(tmp / "out")], "--updates must be >= 1"),
        (["bench", "--teacher", "fewstep/assets/digits_teacher", "--teacher-steps", "1,x", "--out", str(tmp / "out")],
         "comma-separated integers"),
    ]


def _refused(argv, expected, tmp_path, capsys) -> None:
    """One line on stderr holding ``expected``, exit 2, and no output written."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], (argv, code, err)
    assert not (tmp_path / "out").exists(), argv
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "fused").exists(), argv


def test_bad_input_gives_one_line_exit_2_and_writes_nothing(tmp_path, tiny_dirs, capsys):
    cases = _cases(tmp_path, tiny_dirs)
    assert len(cases) >= 30
    for argv, expected in cases:
        _refused(argv, expected, tmp_path, capsys)


def _binary(tmp):
    path = tmp / "binary.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return [(["distill", str(path)], "binary.yaml is not a text file (not UTF-8)"),
            (["validate", str(path)], "binary.yaml is not a text file (not UTF-8)")]


def _captionless(tmp, sd):
    nocap = _images(tmp / "nocap")
    (nocap / "a.txt").unlink()  # an image without its caption
    return [(["distill", "sd15_lcm_lora", f"train.output_dir={tmp / 'out'}", f"teacher.path={sd}", f"data.root={nocap}",
              "data.resolution=32"], f"1 of 1 images in {nocap} have no caption (first: a.png) and the model is text-to-image")]


def _output_dir_a_file(tmp):
    a_file = tmp / "a_file"
    a_file.write_text("not a directory")
    return [([verb, "gmm_teacher", f"train.output_dir={a_file}"], f"train.output_dir {a_file} is a file, not a directory")
            for verb in ("distill", "validate")]


#: issue 42's bad-input cases, each a named test: (argv, what the one line says) pairs from (tmp, tiny SD path)
ISSUE_42 = {
    "binary_recipe": lambda tmp, sd: _binary(tmp),
    "captionless_images_for_a_text_teacher": _captionless,
    "output_dir_is_a_file": lambda tmp, sd: _output_dir_a_file(tmp),
    "data_batch_size_negative": lambda tmp, sd: [
        ([verb, "gmm_teacher", f"train.output_dir={tmp / 'out'}", "data.batch_size=-4"],
         "unknown key data.batch_size; valid for mixture ring:") for verb in ("distill", "validate")],
    "fp16_on_a_cpu": lambda tmp, sd: [(["distill", "gmm_teacher", f"train.output_dir={tmp / 'out'}",
                                        "train.mixed_precision=fp16"], "train.mixed_precision fp16 on a CPU")],
    "tracker_package_missing": lambda tmp, sd: [(["distill", "gmm_teacher", f"train.output_dir={tmp / 'out'}",
                                                  "train.trackers=[wandb]"], "train.trackers: wandb is not installed")],
    "negative_lr_typed_as_written": lambda tmp, sd: [(["distill", "gmm_teacher", f"train.output_dir={tmp / 'out'}",
                                                       "optimizer.lr=-1e-4"], "Invalid learning rate")],
    "unwritable_output_dir": lambda tmp, sd: [(["distill", "gmm_teacher", "train.output_dir=/proc/forbidden/x"],
                                               "/proc/forbidden/x cannot be created")],
}


@pytest.mark.parametrize("case", sorted(ISSUE_42))
def test_issue_42_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, tiny_dirs, capsys):
    """The second run on a live directory: tests/test_runlock.py; a shadowed stage key (applied): below."""
    for argv, expected in ISSUE_42[case](tmp_path, str(tiny_dirs["sd"])):
        _refused(argv, expected, tmp_path, capsys)


def test_a_directory_holding_another_run_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "gmm_teacher", f"train.output_dir={out}", "train.max_steps=2", "train.progress=false"]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["distill", "gmm_cd", f"train.output_dir={out}", "train.max_steps=2", "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run of a different recipe" in err[0]
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    """A checkpoint write that fails with ENOSPC leaves the earlier checkpoint intact and the newest readable."""
    import errno

    from fewstep import checkpoint
    from fewstep.checkpoint import latest_intact, load_checkpoint

    out = tmp_path / "run"
    args = ["distill", "gmm_teacher", f"train.output_dir={out}", "train.max_steps=4", "train.checkpoint_every=2",
            "train.progress=false"]
    real = checkpoint.save_safetensors_atomic

    def full_disk(tensors, path, *a, **k):
        if "step-00000004" in str(path):  # the first checkpoint succeeds; the second hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_safetensors_atomic", full_disk)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "previous checkpoint is kept" in err[0], err
    newest = latest_intact(out / "checkpoints", report=lambda m: None)
    assert newest is not None and newest.name == "step-00000002"
    load_checkpoint(newest)  # intact
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != "step-00000002"]


def test_a_top_level_override_reaches_a_stage_that_sets_the_same_key():
    """sd15_dmd's gan stage restates loss.fake_updates: the command line's value reaches it too (issue 42), while a
    key the stage does not set (data.path of its image data) stays out of it."""
    from fewstep.config import load_recipe
    from fewstep.run import stage_recipes

    stages = {n: r for n, _, r in stage_recipes(load_recipe("sd15_dmd", ["loss.fake_updates=1", "data.path=p.txt"]))}
    assert stages["dmd"].loss["fake_updates"] == 1 and stages["gan"].loss["fake_updates"] == 1
    assert stages["dmd"].data["path"] == "p.txt" and "path" not in stages["gan"].data
