"""Two processes through accelerate (gloo on CPU, started by torchrun) train the same model as one process
with the whole batch: gradients are averaged by DistributedDataParallel, every sample keeps its seed.

``accelerate launch --num_processes 2`` on a CPU-only machine quietly runs one process, so each test
checks that two really ran (the loop's "2 processes" line, and one "finished" line from each).
"""
import os
import socket
import subprocess
import sys

from pathlib import Path

import pytest
from safetensors.torch import load_file

from fewstep.checkpoint import latest_intact
from fewstep.cli import main
from fewstep.config import available_recipes
from tests.test_recipes import finished, smoke_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu_2proc.yaml"


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def launch_command(args: list[str], nproc: int = 2, accelerate_config: Path | None = None) -> list[str]:
    """``torchrun --nproc_per_node N -m fewstep ARGS``, or ``accelerate launch --config_file CONFIG``, on a free port."""
    if accelerate_config is None:
        how = ["torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1"]
    else:
        how = ["accelerate.commands.launch", "--config_file", str(accelerate_config), "--main_process_ip", "127.0.0.1"]
    port = ["--master_port" if accelerate_config is None else "--main_process_port", str(free_port())]
    return [sys.executable, "-m", *how, *port, "-m", "fewstep", *args]


def launch(args: list[str], nproc: int = 2, accelerate_config: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``launch_command`` to its end."""
    return subprocess.run(launch_command(args, nproc, accelerate_config), env=launch_env(), capture_output=True,
                          text=True, timeout=600)


def torchrun(args: list[str], nproc: int = 2, accelerate_config: Path | None = None) -> str:
    """``launch``, checking that it succeeded and that N processes ran; returns its output."""
    done = launch(args, nproc, accelerate_config)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"fewstep: {nproc} processes (MULTI_CPU)" in out, out[-3000:]
    assert out.count("fewstep: finished at step") == nproc, out[-3000:]
    return out


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def weights(run, step: int, group: str = "student") -> dict:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / f"{group}.safetensors")


QUIET = ["train.progress=false", "train.log_every=1"]


def test_diffusion_two_processes_match_one_and_resume_with_one(tmp_path):
    """DiffusionLoss: 2 processes x 8 samples == 1 process x 16 after one optimizer step (1e-5); the
    checkpoint they wrote once resumes in one process and ends where an uninterrupted run ends."""
    common = ["gmm_teacher", "train.batch_size=16", *QUIET]
    torchrun(["distill", *common, "train.max_steps=1", f"train.output_dir={tmp_path / 'two'}"])
    assert main(["distill", *common, "train.max_steps=1", f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert max_diff(weights(tmp_path / "two", 1), weights(tmp_path / "one", 1)) < 1e-5
    # the check can fail: one process with only its own half of the batch lands elsewhere
    assert main(["distill", "gmm_teacher", "train.batch_size=8", *QUIET, "train.max_steps=1",
                 f"train.output_dir={tmp_path / 'half'}"]) == 0
    assert max_diff(weights(tmp_path / "half", 1), weights(tmp_path / "one", 1)) > 1e-3
    # written once, by the main process: one log row, one intact checkpoint
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == 1
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-00000001"]
    assert latest_intact(tmp_path / "two" / "checkpoints").name == "step-00000001"
    # resume the two-process run in one process
    assert main(["distill", *common, "train.max_steps=3", f"train.output_dir={tmp_path / 'two'}"]) == 0
    assert main(["distill", *common, "train.max_steps=3", f"train.output_dir={tmp_path / 'one3'}"]) == 0
    assert max_diff(weights(tmp_path / "two", 3), weights(tmp_path / "one3", 3)) < 1e-5
    assert max_diff(weights(tmp_path / "two", 3, "ema"), weights(tmp_path / "one3", 3, "ema")) < 1e-5


def test_fdistill_two_processes_match_one(tmp_path):
    """f-distill (reverse KL, its fake score a second trained network): two fake-score steps and one
    generator step on 2 processes x 8 equal 1 x 16 for the student and the fake score (1e-5), both stages.
    The two processes also accumulate (2 micro-batches of 4 each: DDP syncs on the last one only), and
    are launched with accelerate and the shipped recipes/accelerate/cpu_2proc.yaml."""
    common = ["gmm_fdistill", "train.max_steps=3", *QUIET]
    out = torchrun(["distill", *common, "train.batch_size=8", "train.grad_accum=2", f"train.output_dir={tmp_path / 'two'}"],
                   accelerate_config=CPU_CONFIG)
    assert "fewstep: 2 processes (MULTI_CPU), 4 samples each per micro-batch" in out
    assert out.count("fewstep: 2 processes") == 2  # the pretraining stage and the f-distill stage
    assert main(["distill", *common, "train.batch_size=16", f"train.output_dir={tmp_path / 'one'}"]) == 0
    for stage, groups in (("pretrain", ["student"]), ("fdistill", ["student", "module.fake_score"])):
        for group in groups:
            assert max_diff(weights(tmp_path / "two" / stage, 3, group), weights(tmp_path / "one" / stage, 3, group)) < 1e-5


@pytest.mark.slow
def test_scm_two_processes_match_one(tmp_path):
    """sCM (its JVP tangent through the DDP-wrapped student, the adaptive weight a second trained network): three
    steps on 2 processes x 8 equal 1 x 16 for the student and the weighting (1e-5), after the pre-training stage."""
    common = ["gmm_scm", "train.max_steps=3", "train.batch_size=16", *QUIET]
    torchrun(["distill", *common, f"train.output_dir={tmp_path / 'two'}"])
    assert main(["distill", *common, f"train.output_dir={tmp_path / 'one'}"]) == 0
    for group in ("student", "module.weighting"):
        assert max_diff(weights(tmp_path / "two" / "scm", 3, group), weights(tmp_path / "one" / "scm", 3, group)) < 1e-5
    assert float(weights(tmp_path / "two" / "scm", 3, "module.weighting")["linear.bias"].abs()) > 0  # it trained


@pytest.mark.slow
def test_rcm_two_processes_match_one(tmp_path):
    """rCM (sCM's JVP and adaptive weight, DMD's fake score in its own phase): six steps (two student updates) on 2
    processes x 8 equal 1 x 16 for the student, the weighting and the fake score (1e-5)."""
    common = ["gmm_rcm", "train.max_steps=6", "train.batch_size=16", *QUIET]
    torchrun(["distill", *common, f"train.output_dir={tmp_path / 'two'}"])
    assert main(["distill", *common, f"train.output_dir={tmp_path / 'one'}"]) == 0
    for group in ("student", "module.weighting", "module.fake_score"):
        assert max_diff(weights(tmp_path / "two" / "rcm", 6, group), weights(tmp_path / "one" / "rcm", 6, group)) < 1e-5


def test_batch_that_does_not_split_is_refused(tmp_path):
    done = launch(["distill", "gmm_teacher", "train.batch_size=5", "train.max_steps=1", *QUIET,
                   f"train.output_dir={tmp_path / 'odd'}"])
    assert done.returncode != 0
    assert "train.batch_size 5 (all processes together) does not split over 2 processes; valid process counts for it: 1, 5, or train.batch_size=4 here" in done.stderr
    assert not (tmp_path / "odd").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_recipe_runs_on_two_processes(name, tmp_path, tiny_dirs, captioned_dir):
    """Opt-in (-m slow): each shipped recipe, smoke-sized, on two processes."""
    out = tmp_path / name
    torchrun(smoke_args(name, out, tiny_dirs, captioned_dir))
    assert finished(name, out)


def test_sharded_launches_are_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """FSDP/DeepSpeed would hand the loop parameter shards; it refuses them in one line, writing nothing.
    (On a CPU-only machine accelerate cannot start FSDP at all, so the launch type is patched in.)"""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self, k=kind: k))
        assert main(["distill", "gmm_teacher", "train.max_steps=1", *QUIET, f"train.output_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"distributed_type {kind.value} is not supported" in err[0], err
        assert not (tmp_path / "run").exists()
