"""train.parallel=fsdp (FSDP2 through torch.distributed.fsdp.fully_shard, checkpoints through
torch.distributed.checkpoint): 2 sharded processes train what 1 process trains, a sharded checkpoint resumes on
another process count, and a one-process fsdp run equals a plain one bit for bit (opt-in: `pytest -m slow`)."""
import re

import pytest
from safetensors.torch import load_file

from fewstep.cli import main
from tests.test_multiprocess import QUIET, max_diff, torchrun

COMMON = ["gmm_teacher", "train.batch_size=16", *QUIET]
FINAL = ("final", "mlp", "diffusion_pytorch_model.safetensors")


def exported(run):
    return load_file(run.joinpath(*FINAL))


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_on_one(tmp_path, capsys):
    fsdp = "train.parallel=fsdp"
    out = torchrun(["distill", *COMMON, fsdp, "train.max_steps=3", f"train.output_dir={tmp_path / 'two'}"])
    # really sharded: each process holds about half of the student's parameters
    held = [(int(a), int(b)) for a, b in re.findall(r"fewstep: fsdp process \d holds (\d+) of (\d+) student", out)]
    assert len(held) == 2 and held[0][1] == held[1][1] and sum(a for a, _ in held) == held[0][1]
    assert all(0.4 < a / b < 0.6 for a, b in held)
    step3 = tmp_path / "two" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in (step3 / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert main(["distill", *COMMON, "train.max_steps=3", f"train.output_dir={tmp_path / 'one'}"]) == 0
    assert max_diff(exported(tmp_path / "two"), exported(tmp_path / "one")) < 1e-5  # EMA weights, gathered
    # the check can fail: one process on half the batch lands elsewhere
    assert main(["distill", "gmm_teacher", "train.batch_size=8", *QUIET, "train.max_steps=3",
                 f"train.output_dir={tmp_path / 'half'}"]) == 0
    assert max_diff(exported(tmp_path / "half"), exported(tmp_path / "one")) > 1e-3
    # one fsdp process equals one plain process bit for bit
    assert main(["distill", *COMMON, fsdp, "train.max_steps=3", f"train.output_dir={tmp_path / 'one_fsdp'}"]) == 0
    assert max_diff(exported(tmp_path / "one_fsdp"), exported(tmp_path / "one")) == 0.0
    # the 2-process sharded checkpoint resumes on one process (resharded) and ends where an uninterrupted run ends
    assert main(["distill", *COMMON, fsdp, "train.max_steps=6", f"train.output_dir={tmp_path / 'two'}"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["distill", *COMMON, "train.max_steps=6", f"train.output_dir={tmp_path / 'one6'}"]) == 0
    assert max_diff(exported(tmp_path / "two"), exported(tmp_path / "one6")) < 1e-5


@pytest.mark.slow
def test_fsdp_refuses_a_plain_run_and_networks_it_cannot_shard_yet(tmp_path, capsys):
    assert main(["distill", *COMMON, "train.max_steps=2", "train.checkpoint_every=1", "train.max_wall_time=0",
                 f"train.output_dir={tmp_path / 'plain'}"]) == 0
    assert main(["distill", *COMMON, "train.parallel=fsdp", "train.max_steps=3",
                 f"train.output_dir={tmp_path / 'plain'}"]) == 2
    assert "differs in train.parallel" in capsys.readouterr().err  # the run directory keeps its recipe
    assert main(["distill", "gmm_cd", "train.parallel=fsdp", "train.max_steps=1", *QUIET,
                 f"train.output_dir={tmp_path / 'cd'}"]) == 2
    assert "train.parallel=fsdp shards only the student so far" in capsys.readouterr().err
