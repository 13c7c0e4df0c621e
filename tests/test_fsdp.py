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


def sharded_weights(run, step: int, network: str, tmp_path) -> dict:
    """A network's trained state from a sharded checkpoint, whole (DCP's own converter, then a weights-only load)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    file = tmp_path / f"{run.name}-{step}-{network}.pt"
    dcp_to_torch_save(run / "checkpoints" / f"step-{step:08d}" / "shards", file)
    return torch.load(file, weights_only=True)["networks"][network]


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
def test_fsdp_refuses_a_plain_run_directory(tmp_path, capsys):
    assert main(["distill", *COMMON, "train.max_steps=2", "train.checkpoint_every=1", "train.max_wall_time=0",
                 f"train.output_dir={tmp_path / 'plain'}"]) == 0
    assert main(["distill", *COMMON, "train.parallel=fsdp", "train.max_steps=3",
                 f"train.output_dir={tmp_path / 'plain'}"]) == 2
    assert "differs in train.parallel" in capsys.readouterr().err  # the run directory keeps its recipe


@pytest.mark.slow
def test_fsdp_fdistill_with_discriminator_two_processes_match_one(tmp_path):
    """f-distill with its GAN term: student, fake score and discriminator all sharded; two fake-score steps and one
    generator step on 2 processes x 8 equal 1 plain process x 16 (1e-5) for the three networks."""
    common = ["gmm_fdistill", "train.max_steps=3", "train.batch_size=16", "loss.gan_weight=0.001", *QUIET]
    torchrun(["distill", *common, "train.parallel=fsdp", f"train.output_dir={tmp_path / 'two'}"])
    assert main(["distill", *common, f"train.output_dir={tmp_path / 'one'}"]) == 0
    for network in ("student", "fake_score", "discriminator"):
        group = "student" if network == "student" else f"module.{network}"
        one = load_file(tmp_path / "one" / "fdistill" / "checkpoints" / "step-00000003" / f"{group}.safetensors")
        two = sharded_weights(tmp_path / "two" / "fdistill", 3, network, tmp_path)
        assert max_diff({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in two.items()}, one) < 1e-5
