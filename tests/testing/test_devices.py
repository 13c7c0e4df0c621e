"""CUDA's device rules on a CPU (fewstep.testing.devices.VirtualAccelerator): the check itself, then every
loss's training (forward and backward, with its sampling and export) at 1 and 4 generator steps.

Before this check, ``FDivergenceLoss.generate`` indexed its CPU timestep grid with per-sample step indices
living on the student's device (``ts[j]``): every multi-step f-distill/DMD run on a GPU stopped at its first
step, and CPU tests could not see it."""
import copy
from pathlib import Path

import pytest
import torch
import yaml

from fewstep.cli import main
from fewstep.config import available_recipes, load_recipe
from fewstep.testing.devices import DeviceMismatch, VirtualAccelerator
from tests.test_recipes import SMOKED_UNDER_DEVICE_CHECK, finished, smoke_args

DEVICE = torch.device("cpu")  # what `accelerator.device` is on this machine: the virtual accelerator
HERE = str(Path(__file__).resolve().parent)  # the unit tests below check calls made from this file too


def test_host_tensors_indexed_or_mixed_with_accelerator_tensors_raise():
    with VirtualAccelerator(packages=(HERE,)):
        table = torch.linspace(0, 1, 10, dtype=torch.float64)  # made without a device: on the host
        j = torch.tensor([1, 3]).to(DEVICE)
        x = torch.randn(2, 3, device=DEVICE)
        with pytest.raises(DeviceMismatch, match="indexed with accelerator indices"):
            table[j]
        with pytest.raises(DeviceMismatch, match="mixed with accelerator tensors"):
            x + torch.ones(2, 3)
        with pytest.raises(DeviceMismatch, match="mixed with accelerator tensors"):
            torch.stack([x, torch.zeros(2, 3)])
        # what CUDA accepts: the table moved first, host indices into an accelerator tensor, 0-dim host scalars,
        # explicit copies, and host-only arithmetic
        torch.testing.assert_close(table.to(DEVICE)[j], table[torch.tensor([1, 3])])
        x[torch.tensor([0])]
        x * torch.tensor(2.0)
        x.copy_(torch.ones(2, 3))
        torch.ones(3) + torch.zeros(3)
        assert (x.to("cpu") + torch.ones(2, 3)).shape == (2, 3)  # .to("cpu"): on the host again


def test_a_network_on_the_device_trains_without_false_alarms():
    """Parameters are made by C++ code (of unknown place, never flagged): a network and its inputs moved to
    the device run forward and backward; an input left on the host, mixed with the output, is caught."""
    with VirtualAccelerator(packages=(HERE,)):
        net = torch.nn.Linear(3, 2).to(DEVICE)
        x = torch.randn(4, 3).to(DEVICE)
        y = net(x)
        y.sum().backward()
        assert net.weight.grad is not None
        with pytest.raises(DeviceMismatch):
            y - torch.randn(4, 2)


def _recipe_file(tmp_path, name: str, steps: int):
    """The shipped recipe with its generator at ``steps`` steps (its last stage's loss, if it has stages)."""
    raw = copy.deepcopy(load_recipe(name).raw)
    target = raw["stages"][-1] if raw.get("stages") else raw
    target["loss"] = {**(target.get("loss") or raw["loss"]), "steps": steps}
    path = tmp_path / f"{name}_{steps}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


#: every loss once (diffusion, classifier, consistency, f-distill, reflow and flow distillation), those with a
#: generator step count at 1 and 4 steps, over the analytic ring teacher; and the SD path's f-distill (with
#: backward simulation), f-distill's discriminator on UNet features, LCM, and ODE regression with f-distill at
#: timestep 399 (SDXL), over the tiny pipelines. The recipes run as shipped here are the default suite's smoke runs of
#: them (tests/test_recipes.py leaves their plain runs to -m slow).
CASES = [(name, None) for name in SMOKED_UNDER_DEVICE_CHECK] + [("sd15_dmd", 4), ("sd15_fdistill_js", 1)] + [
    (name, steps) for name in ("gmm_fdistill", "gmm_reflow") for steps in (1, 4)]


def _train_under_device_rules(name: str, steps: int | None, tmp_path, tiny_dirs, captioned_dir) -> None:
    out = tmp_path / "run"
    args = smoke_args(name, out, tiny_dirs, captioned_dir)
    if steps is not None:
        args[1] = str(_recipe_file(tmp_path, name, steps))
    with VirtualAccelerator() as check:
        assert main(args) == 0
    assert check.checked > 500  # the check really saw fewstep's calls
    assert finished(name, out)


@pytest.mark.parametrize("name,steps", CASES, ids=[f"{n}-{s}" if s else n for n, s in CASES])
def test_every_loss_trains_under_cuda_device_rules(name, steps, tmp_path, tiny_dirs, captioned_dir, capsys):
    _train_under_device_rules(name, steps, tmp_path, tiny_dirs, captioned_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_recipe_trains_under_cuda_device_rules(name, tmp_path, tiny_dirs, captioned_dir, capsys):
    """Opt-in (-m slow, about 5 minutes): each shipped recipe, smoke-sized, under the check."""
    _train_under_device_rules(name, None, tmp_path, tiny_dirs, captioned_dir)
