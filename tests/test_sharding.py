"""train.parallel=fsdp (FSDP2 through torch.distributed.fsdp.fully_shard, checkpoints through
torch.distributed.checkpoint): 2 sharded processes train what 1 process trains, a sharded checkpoint resumes on
another process count and after SIGKILLs, the SD exports load in plain diffusers (opt-in: `pytest -m slow`, about
5 minutes); a one-process fsdp run equals a plain one bit for bit and the dry run's fsdp rows (default suite)."""
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fewstep.cli import main
from tests.test_multiprocess import QUIET, max_diff, torchrun

COMMON = ["gmm_teacher", "train.batch_size=16", *QUIET]
FINAL = ("final", "mlp", "diffusion_pytorch_model.safetensors")


def assert_sharded(out: str, networks=("student",), processes: int = 2, whole_on_one=()) -> None:
    """Each process's line ``fewstep: fsdp process R holds X of Y NAME parameters``: for every network, one line per
    process (per stage), the local shards (DTensor.to_local) adding up to the whole, each about 1/N of it. FSDP2
    splits each parameter along its first dimension, so a network in ``whole_on_one`` (sCM's weighting: a (1, 128)
    linear) only has its shards add up."""
    for name in networks:
        held = [(int(a), int(b)) for a, b in re.findall(rf"fewstep: fsdp process \d holds (\d+) of (\d+) {name} param", out)]
        assert held and len(held) % processes == 0, (name, held)  # a multi-stage recipe prints each stage's
        for whole in {b for _, b in held}:  # the processes' output interleaves in any order: group by the whole
            parts = [a for a, b in held if b == whole]
            assert len(parts) % processes == 0 and sum(parts) * processes == whole * len(parts), (name, held)
        assert name in whole_on_one or all(abs(a / b - 1 / processes) < 0.1 for a, b in held), (name, held)


def exported(run):
    return load_file(run.joinpath(*FINAL))


def sharded_weights(run, step: int, network: str, tmp_path) -> dict:
    """A network's trained state from a sharded checkpoint, whole (DCP's own converter, then a weights-only load)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    file = tmp_path / f"{run.name}-{step}-{network}.pt"
    dcp_to_torch_save(run / "checkpoints" / f"step-{step:08d}" / "shards", file)
    return torch.load(file, weights_only=True)["networks"][network]


@pytest.mark.parametrize("device, expected", [("cuda:0", {"cpu": "gloo", "cuda": "nccl"}),
                                              ("cpu", {"cpu": "gloo", "cuda": "gloo"})])
def test_a_one_process_group_gathers_the_devices_tensors_with_its_backend(device, expected, monkeypatch):
    """A one-process fsdp run makes its own group: on a GPU, FSDP2's reduce-scatter of CUDA tensors needs NCCL (gloo
    has none), while checkpoints use host tensors (gloo). torch's own parser reads the backend string."""
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from fewstep import sharding

    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: made.append(backend))
    assert sharding.process_group(torch.device(device))
    assert BackendConfig(Backend(made[0])).get_device_backend_map() == expected


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_on_one(tmp_path, capsys):
    fsdp = "train.parallel=fsdp"
    out = torchrun(["distill", *COMMON, fsdp, "train.max_steps=3", f"train.output_dir={tmp_path / 'two'}"])
    # really sharded: each process holds about half of the student's parameters
    assert_sharded(out)
    step3 = tmp_path / "two" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in (step3 / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert main(["distill", *COMMON, "train.max_steps=3", f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert max_diff(exported(tmp_path / "two"), exported(tmp_path / "one")) < 1e-5  # EMA weights, gathered
    # the check can fail: one process on half the batch lands elsewhere
    assert main(["distill", "gmm_teacher", "train.batch_size=8", *QUIET, "train.max_steps=3",
                 f"train.output_dir={tmp_path / 'half'}"]) == 0
    assert max_diff(exported(tmp_path / "half"), exported(tmp_path / "one")) > 1e-3
    # the 2-process sharded checkpoint resumes on one process (resharded) and ends where an uninterrupted run ends
    assert main(["distill", *COMMON, fsdp, "train.max_steps=6", f"train.output_dir={tmp_path / 'two'}"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["distill", *COMMON, "train.max_steps=6", f"train.output_dir={tmp_path / 'one6'}"]) == 0
    assert max_diff(exported(tmp_path / "two"), exported(tmp_path / "one6")) < 1e-5


def test_one_fsdp_process_equals_a_plain_one_bit_for_bit(tmp_path):
    """In the default suite: one fsdp process (a gloo group of one, FSDP2 units, DCP checkpoints) trains exactly
    what one plain process trains, and writes its checkpoint as DCP shards."""
    for run, extra in (("plain", []), ("fsdp", ["train.parallel=fsdp"])):
        assert main(["distill", *COMMON, *extra, "train.max_steps=3", f"train.output_dir={tmp_path / run}"]) == 0
    assert max_diff(exported(tmp_path / "fsdp"), exported(tmp_path / "plain")) == 0.0
    shards = tmp_path / "fsdp" / "checkpoints" / "step-00000003" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp"]


@pytest.mark.slow
def test_fsdp_refuses_a_plain_run_directory(tmp_path, capsys):
    assert main(["distill", *COMMON, "train.max_steps=2", "train.checkpoint_every=1", "train.max_wall_time=0",
                 f"train.output_dir={tmp_path / 'plain'}"]) == 0
    assert main(["distill", *COMMON, "train.parallel=fsdp", "train.max_steps=3",
                 f"train.output_dir={tmp_path / 'plain'}"]) == 2
    assert "differs in train.parallel" in capsys.readouterr().err  # the run directory keeps its recipe


@pytest.mark.slow
@pytest.mark.parametrize("recipe, stage, networks, extra", [
    ("gmm_fdistill", "fdistill", ("student", "fake_score", "discriminator"), ["loss.gan_weight=0.001"]),
    ("gmm_scm", "scm", ("student", "weighting"), []),
    ("gmm_rcm", "rcm", ("student", "weighting", "fake_score"), []),
], ids=["fdistill_gan", "scm", "rcm"])
def test_fsdp_auxiliary_networks_two_processes_match_one(recipe, stage, networks, extra, tmp_path):
    """Every trained network sharded: f-distill with its GAN term (student, fake score, discriminator; two
    fake-score steps and one generator step), sCM (student through the JVP, the adaptive weighting) and rCM (both
    of those and a fake score; two fake-score steps and one student step) on 2 fsdp
    processes x 8 equal 1 plain process x 16 (1e-5) for each network, read from the sharded checkpoint."""
    common = [recipe, "train.max_steps=3", "train.batch_size=16", *extra, *QUIET]
    out = torchrun(["distill", *common, "train.parallel=fsdp", f"train.output_dir={tmp_path / 'two'}"])
    assert_sharded(out, networks, whole_on_one=("weighting",))
    assert "returned a view tensor" not in out  # FSDP2's warning that a unit's output would skip its hooks
    assert main(["distill", *common, f"train.output_dir={tmp_path / 'one'}"]) == 0
    for network in networks:
        group = "student" if network == "student" else f"module.{network}"
        one = load_file(tmp_path / "one" / stage / "checkpoints" / "step-00000003" / f"{group}.safetensors")
        two = sharded_weights(tmp_path / "two" / stage, 3, network, tmp_path)
        two = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in two.items()}
        assert max_diff(two, one) < 1e-5

def _sd_consistency(tmp_path, tiny_sd, images, lora: bool, base_dtype: str | None = None):
    """A consistency-distillation recipe file on the tiny SD pipeline: full (student and its EMA target copy both
    sharded) or LoRA (adapters trained, the frozen base sharded, the online student as target). SGD: AdamW's first
    steps move a weight by about lr whatever the size of its gradient, so gradients that differ by rounding alone
    (the 2-process sum's order) moved weights 4e-4 apart under DDP as under fsdp; SGD's update keeps their size."""
    import yaml

    from tests.test_lora import LORA

    raw = {"name": "fsdp_sd", "teacher": {"kind": "pipeline", "path": str(tiny_sd)},
           "student": {"kind": "pipeline", "init": "teacher"}, "optimizer": {"name": "SGD", "lr": 1.0},
           "loss": {"name": "consistency", "target": "online" if lora else "ema", "num_timesteps": 10},
           "data": {"name": "images", "root": str(images), "resolution": 32},
           "sample": {"solver": "consistency", "spacing": "lcm", "steps": 1, "num": 1},
           "train": {"max_steps": 2, "batch_size": 4, "sample_every": 0, "ema_decay": 0.9}}
    if lora:
        raw["lora"] = {**LORA, **({"base_dtype": base_dtype} if base_dtype else {})}
    path = tmp_path / ("sd_lora.yaml" if lora else "sd_full.yaml")
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_sd_export_equals_one_process_and_loads_in_plain_diffusers(lora, tmp_path, tiny_dirs, captioned_dir):
    """Consistency distillation of the tiny SD UNet on 2 fsdp processes: the exported final/ (a pipeline, or a
    diffusers-format LoRA gathered on the main process) equals a 1-process plain run's to 1e-5, and plain diffusers
    (from_pretrained / load_lora_weights) reproduces fewstep's own one-step sample from it to 1e-5."""
    import torch

    from fewstep.generate import Generator
    from tests.test_lora import PROMPT, _one_step, _plain_sample

    recipe = _sd_consistency(tmp_path, tiny_dirs["sd"], captioned_dir, lora)
    # the teacher sharded too (train.fsdp_teacher=shard): its forward gathers and reshards like the trained networks'
    out = torchrun(["distill", recipe, *QUIET, "train.parallel=fsdp", f"train.fsdp_teacher={'replicate' if lora else 'shard'}",
                    f"train.output_dir={tmp_path / 'two'}"])
    assert "returned a view tensor" not in out
    assert_sharded(out)
    assert main(["distill", recipe, *QUIET, f"train.output_dir={tmp_path / 'one'}"]) == 0
    file = ("pytorch_lora_weights.safetensors",) if lora else ("unet", "diffusion_pytorch_model.safetensors")
    two, one = (load_file(tmp_path / run / "final" / Path(*file)) for run in ("two", "one"))
    assert max_diff(two, one) < 1e-5
    base = load_file(tiny_dirs["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    if not lora:  # the check can fail: the UNet moved away from the teacher's
        assert max_diff(two, base) > 1e-4
    else:
        assert all(k.startswith("unet.") and "lora_" in k for k in two)
    final = tmp_path / "two" / "final"
    ours = Generator.load(str(final))(1, seed=0, prompts=[PROMPT])
    if lora:
        _, plain = _plain_sample(final, tiny_dirs["sd"])
    else:
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(final)
        pipe.set_progress_bar_config(disable=True)
        plain = lambda: _one_step(pipe)  # noqa: E731
    assert torch.allclose(plain(), ours, atol=1e-5)


@pytest.mark.slow
def test_fsdp_lora_with_a_bfloat16_base_equals_one_process(tmp_path, tiny_dirs, captioned_dir):
    """lora.base_dtype: bfloat16 under fsdp: the frozen bfloat16 base and the float32 adapters in the same FSDP units
    (FSDP2 asks a uniform dtype of the trainable parameters only); the adapters after two steps equal a 1-process
    run's to 1e-3 (both compute in bfloat16, on batches of 2 and 4)."""
    recipe = _sd_consistency(tmp_path, tiny_dirs["sd"], captioned_dir, True, "bfloat16")
    out = torchrun(["distill", recipe, *QUIET, "train.parallel=fsdp", "train.fsdp_teacher=replicate",
                    f"train.output_dir={tmp_path / 'two'}"])
    assert_sharded(out)
    assert main(["distill", recipe, *QUIET, f"train.output_dir={tmp_path / 'one'}"]) == 0
    two, one = (load_file(tmp_path / run / "final" / "pytorch_lora_weights.safetensors") for run in ("two", "one"))
    assert all(v.dtype.is_floating_point and v.element_size() == 4 for v in two.values())
    assert max_diff(two, one) < 1e-3


@pytest.mark.slow
def test_fsdp_sigkill_at_random_steps_then_resume_equals_uninterrupted(tmp_path):
    """Three SIGKILLs of a whole 2-process fsdp launch (torchrun, then both workers, as a lost node) at random moments
    of training, each followed by a relaunch that resumes from the newest intact sharded checkpoint: the final
    export equals an uninterrupted 2-process fsdp run's bit for bit."""
    import contextlib
    import random
    import subprocess
    import time

    import psutil

    from tests.test_multiprocess import launch_command, launch_env

    args = ["distill", "gmm_teacher", "train.parallel=fsdp", "train.batch_size=16", "train.max_steps=300",
            "train.checkpoint_every=10", "train.log_every=5", "train.progress=false", "train.sample_every=0"]
    assert_sharded(torchrun([*args, f"train.output_dir={tmp_path / 'ref'}"]))
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    log = out / "log.jsonl"
    lines = lambda: log.read_text().count("\n") if log.exists() else 0  # noqa: E731
    while kills < 3:
        before = lines()
        p = subprocess.Popen(launch_command([*args, f"train.output_dir={out}"]), env=launch_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while p.poll() is None and lines() <= before:  # wait until this launch is training
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))
        if p.poll() is not None:
            break  # it finished first
        workers = psutil.Process(p.pid).children(recursive=True)  # torchrun starts each in its own session
        p.kill()  # torchrun first, so it cannot SIGTERM the workers (the loop would checkpoint on that)
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()
        p.wait()
        psutil.wait_procs(workers, timeout=30)
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        kills += 1
    assert kills == 3
    stopped = [json.loads(r)["step"] for r in log.read_text().splitlines()][-1]
    assert 10 < stopped < 300, stopped  # killed after a checkpoint, before the end
    assert_sharded(torchrun([*args, f"train.output_dir={out}"]))
    assert exported(out).keys() == exported(tmp_path / "ref").keys()
    assert max_diff(exported(out), exported(tmp_path / "ref")) == 0.0
    assert (out / "DONE").read_text() == (tmp_path / "ref" / "DONE").read_text()


@pytest.mark.slow
def test_fsdp_one_process_checkpoint_resumes_on_two(tmp_path):
    """1 -> 2: a one-process fsdp run's sharded checkpoint at step 3 resumes on 2 processes (resharded on load) and
    ends where an uninterrupted one-process run ends (1e-5)."""
    common = ["gmm_teacher", "train.batch_size=16", "train.parallel=fsdp", *QUIET]
    assert main(["distill", *common, "train.max_steps=3", f"train.output_dir={tmp_path / 'run'}"]) == 0
    out = torchrun(["distill", *common, "train.max_steps=6", f"train.output_dir={tmp_path / 'run'}"])
    assert_sharded(out)
    assert "resumed from" in out and "at step 3" in out
    assert main(["distill", *common, "train.max_steps=6", f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert max_diff(exported(tmp_path / "run"), exported(tmp_path / "one")) < 1e-5
    steps = [json.loads(r)["step"] for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # three steps on one process, three on two


def test_dry_run_prints_per_process_estimates_for_ddp_and_fsdp(tiny_dirs, tmp_path, capsys):
    """`--dry-run --num-processes N`: ddp keeps the whole estimate on every process; fsdp 1/N of it, the teacher's
    own weights whole under fsdp_teacher=replicate, plus two of the largest units (here a UNet down/up block,
    counted independently from diffusers' block lists) gathered; N=1 shards nothing; N=0 is refused in one line."""
    import re

    import torch
    from diffusers import UNet2DConditionModel

    from fewstep.config import load_recipe

    over = [f"teacher.path={tiny_dirs['sd']}", "loss.fake_init=teacher", f"train.output_dir={tmp_path / 'x'}"]
    rows = {}
    for n in (1, 4):
        assert main(["distill", "sd15_dmd", "--dry-run", "--num-processes", str(n), *over]) == 0
        out = capsys.readouterr().out
        assert f"per process on {n} processes" in out and "this run: train.parallel=ddp" in out
        rows[n] = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^  (.+?)\s+(?:[\d,]+ trainable\s+)?"
                                                                              r"([\d.]+) GiB", out, re.M)}
    whole = rows[4]["this run"]
    assert rows[1]["ddp: every network on every process"] == rows[1]["fsdp, teacher sharded"] == whole
    assert rows[4]["ddp: every network on every process"] == whole
    unet = UNet2DConditionModel.from_pretrained(tiny_dirs["sd"], subfolder="unet")
    blocks = [*unet.down_blocks, *unet.up_blocks]
    unit = max(sum(p.numel() * 4 for p in b.parameters()) for b in blocks) / 2**30
    size = getattr(torch, load_recipe("sd15_dmd").train.teacher_dtype).itemsize  # the teacher in its recipe's dtype
    teacher = sum(p.numel() * size for p in unet.parameters()) / 2**30
    assert abs(rows[4]["fsdp, teacher sharded"] - (whole / 4 + 2 * unit)) < 1e-3  # printed to 1e-3 GiB
    assert abs(rows[4]["fsdp, teacher replicated"] - ((whole - teacher) / 4 + teacher + 2 * unit)) < 1e-3
    assert rows[4]["fsdp, teacher sharded"] < rows[4]["fsdp, teacher replicated"] < whole
    assert main(["distill", "sd15_dmd", "--dry-run", "--num-processes", "0", *over]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-processes 0" in err[0]


@pytest.mark.slow
def test_fsdp_flux_dmd_with_its_gan_head_two_processes_match_one(tmp_path, tiny_dirs, captioned_dir):
    """flux_dmd's shape on the tiny FLUX.1 [dev] (student, fake score and the token-feature discriminator sharded; two
    fake-score steps, one generator step; SGD as the SD test) on 2 fsdp processes equals 1 plain process to 1e-5: the
    exported transformer and the discriminator head. FSDP2 warns that diffusers' FLUX.1 blocks return views (each
    single-stream block slices its text and image tokens apart, the transformer its output); nothing writes into
    them in place, which these equal gradients show."""
    import yaml

    raw = {"name": "fsdp_flux", "teacher": {"kind": "pipeline", "path": str(tiny_dirs["flux"]), "resolution": 32},
           "student": {"kind": "pipeline", "init": "teacher"}, "optimizer": {"name": "SGD", "lr": 1.0},
           "loss": {"name": "fdistill", "divergence": "reverse_kl", "guidance": 3.5, "fake_updates": 2,
                    "gan_weight": 0.03, "fake_target": "x0"},
           "data": {"name": "images", "root": str(captioned_dir), "resolution": 32},
           "sample": {"solver": "renoise", "steps": 1, "num": 1},
           "train": {"max_steps": 3, "batch_size": 4, "sample_every": 0, "checkpoint_every": 3}}
    recipe = tmp_path / "flux.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = torchrun(["distill", str(recipe), *QUIET, "train.parallel=fsdp", f"train.output_dir={tmp_path / 'two'}"])
    assert_sharded(out, ("student", "fake_score", "discriminator"))
    assert main(["distill", str(recipe), *QUIET, f"train.output_dir={tmp_path / 'one'}"]) == 0
    file = ("final", "transformer", "diffusion_pytorch_model.safetensors")
    two, one = (load_file(tmp_path.joinpath(run, *file)) for run in ("two", "one"))
    assert max_diff(two, one) < 1e-5
    assert max_diff(two, load_file(tiny_dirs["flux"] / "transformer" / "diffusion_pytorch_model.safetensors")) > 1e-4
    disc_one = load_file(tmp_path / "one" / "checkpoints" / "step-00000003" / "module.discriminator.safetensors")
    disc_two = sharded_weights(tmp_path / "two", 3, "discriminator", tmp_path)
    disc_two = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in disc_two.items()}
    assert max_diff(disc_two, disc_one) < 1e-5
