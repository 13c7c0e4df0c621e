"""CUDA's device rules on a CPU (fewstep.testing.devices.VirtualAccelerator): the check itself, then every
loss's training (forward and backward, with its sampling and export) at 1 and 4 generator steps.

Before this check, ``FDivergenceLoss.generate`` indexed its CPU timestep grid with per-sample step indices
living on the student's device (``ts[j]``): every multi-step f-distill/DMD run on a GPU stopped at its first
step, and CPU tests could not see it."""
import copy

import pytest
import torch
import yaml
from torch import Tensor

from fewstep.cli import main
from fewstep.config import available_recipes, load_recipe
from fewstep.testing.devices import ACCELERATOR, DeviceMismatch, VirtualAccelerator
from fewstep.testing.recipes import family_of
from tests.test_recipes import SMOKED_UNDER_DEVICE_CHECK, finished, smoke_args

DEVICE = ACCELERATOR  # what `accelerator.device` is inside the check: the virtual accelerator


def test_host_tensors_indexed_or_mixed_with_accelerator_tensors_raise():
    with VirtualAccelerator():
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
        torch.testing.assert_close(table.to(DEVICE)[j].cpu(), table[torch.tensor([1, 3])])
        x[torch.tensor([0])]
        x * torch.tensor(2.0)
        x.copy_(torch.ones(2, 3))
        torch.ones(3) + torch.zeros(3)
        assert (x.to("cpu") + torch.ones(2, 3)).shape == (2, 3)  # .to("cpu"): on the host again


def test_a_network_on_the_device_trains_without_false_alarms():
    """A network and its inputs moved to the device run forward and backward without a report; an input left on
    the host, mixed with the output, is caught."""
    with VirtualAccelerator():
        net = torch.nn.Linear(3, 2).to(DEVICE)
        x = torch.randn(4, 3).to(DEVICE)
        y = net(x)
        y.sum().backward()
        assert net.weight.grad is not None
        with pytest.raises(DeviceMismatch):
            y - torch.randn(4, 2)


def test_weights_are_where_the_code_put_them():
    """cpu:0 is the accelerator, cpu the host; a network is where Module.to put it, an unmoved one on the host;
    ``device=x.device`` follows x; a gradient is where its parameter is; meta tensors are nowhere (never flagged)."""
    with VirtualAccelerator() as check:
        moved, unmoved = torch.nn.Linear(3, 2).to(ACCELERATOR), torch.nn.Linear(3, 2)
        x = torch.randn(4, 3).to(ACCELERATOR)
        assert x.device == ACCELERATOR and torch.zeros(2).device == torch.device("cpu")
        assert check.where(torch.zeros(2, device=x.device)) == "accelerator"
        assert check.where(torch.zeros(2, device=torch.device("cpu"))) == "host"
        moved(x).sum().backward()
        assert check.where(moved.weight) == "accelerator" and check.where(moved.weight.grad) == "accelerator"
        unmoved(torch.randn(4, 3))  # host with host: what CUDA accepts
        assert check.where(unmoved.weight) == "host"
        torch.zeros(2, device="meta") + torch.zeros(2, device="meta")
        assert check.where(torch.zeros(2, device="meta")) is None


def _planted_library_code(kind: str, x: Tensor) -> Tensor:
    """Three shapes of the mistake, as library code would make them (the check sees every package's calls)."""
    if kind == "network left on the host":
        return torch.nn.Linear(3, 3)(x)  # built on the host, never moved
    if kind == "host table, accelerator indices":
        table = torch.linspace(0.0, 1.0, 1000)
        return table[torch.randint(0, 1000, (x.shape[0],), device=x.device)]
    if kind == "condition built on the host":
        return torch.cat([x, torch.randn(x.shape[0], 3)], dim=1)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["network left on the host", "host table, accelerator indices",
                                  "condition built on the host"])
def test_planted_mutants_are_caught(kind):
    with VirtualAccelerator():
        x = torch.randn(2, 3, device=ACCELERATOR)
        with pytest.raises(DeviceMismatch):
            _planted_library_code(kind, x)
        _planted_library_code(kind, torch.randn(2, 3))  # the same code on the host alone: no report


def _recipe_file(tmp_path, name: str, steps: int):
    """The shipped recipe with its generator at ``steps`` steps (its last stage's loss, if it has stages)."""
    raw = copy.deepcopy(load_recipe(name).raw)
    target = raw["stages"][-1] if raw.get("stages") else raw
    target["loss"] = {**(target.get("loss") or raw["loss"]), "steps": steps}
    path = tmp_path / f"{name}_{steps}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


#: every loss once (diffusion, classifier, consistency, f-distill, reflow and flow distillation), those with a
#: generator step count at 1 and 4 steps, over the analytic ring teacher; every SD-family recipe as shipped over the
#: tiny pipelines; and the SD path's f-distill with backward simulation (4 steps) and at 1 step. The recipes run as
#: shipped here are the default suite's smoke runs of them (tests/test_recipes.py leaves their plain runs to -m slow).
CASES = [(name, None) for name in SMOKED_UNDER_DEVICE_CHECK] + [("sd15_dmd", 4), ("sd15_fdistill_js", 1)] + [
    (name, steps) for name in ("gmm_fdistill", "gmm_reflow") for steps in (1, 4)]
#: recipes that shard (train.parallel: fsdp) run here as one DDP process: FSDP2 puts its gathered parameters on its
#: mesh's device type, and the virtual accelerator (cpu:0) has the host's type. Their sharded runs: tests/test_sharding.py
SHARDED = [n for n in sorted(available_recipes()) if family_of(n) and n not in SMOKED_UNDER_DEVICE_CHECK]


def _train_under_device_rules(name: str, steps: int | None, tmp_path, tiny_dirs, captioned_dir,
                              extra: tuple[str, ...] = ()) -> None:
    """The recipe's smoke run under CUDA's rules (diffusers', transformers', accelerate's code and fewstep's; weights
    where the code put them)."""
    out = tmp_path / "run"
    args = [*smoke_args(name, out, tiny_dirs, captioned_dir), *extra]
    if steps is not None:
        args[1] = str(_recipe_file(tmp_path, name, steps))
    with VirtualAccelerator() as check:
        assert main(args) == 0
    assert check.checked > 500  # the check really saw the calls
    assert finished(name, out)


@pytest.mark.parametrize("name,steps", CASES, ids=[f"{n}-{s}" if s else n for n, s in CASES])
def test_every_loss_trains_under_cuda_device_rules(name, steps, tmp_path, tiny_dirs, captioned_dir, capsys):
    _train_under_device_rules(name, steps, tmp_path, tiny_dirs, captioned_dir)


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_recipes_train_under_cuda_device_rules_as_one_ddp_process(name, tmp_path, tiny_dirs, captioned_dir,
                                                                         capsys):
    _train_under_device_rules(name, None, tmp_path, tiny_dirs, captioned_dir, extra=("train.parallel=ddp",))


@pytest.mark.parametrize("name", ["sd15_lcm", "sd15_instaflow"])  # a training stage; a pairs stage first
def test_text_encoders_left_on_the_host_are_reported(name, tmp_path, tiny_dirs, captioned_dir, capsys, monkeypatch):
    """Issue 41's first defect, planted back: nothing places the pipeline's frozen parts (as before
    LoadedPipeline.frozen_parts), so the text encoder stays on the host while its token ids go to the accelerator."""
    from fewstep.pipelines import LoadedPipeline

    monkeypatch.setattr(LoadedPipeline, "frozen_parts", lambda self: [])
    with pytest.raises(DeviceMismatch, match=r"embedding: host tensor\(s\) of shape \(\d+, 32\)"):
        _train_under_device_rules(name, None, tmp_path, tiny_dirs, captioned_dir)


def _under_device_rules_ran_on_the_accelerator(argv: list[str]) -> set[str]:
    """Run ``fewstep ARGV`` under the check; the places of the denoiser networks' weights each time one
    ran (a UNet's or an MLP's first parameter)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    places: set[str] = set()
    with VirtualAccelerator() as check:
        def record(module, args):
            if isinstance(module, (UNet2DConditionModel, UNet2DModel)):
                places.add(check.where(next(module.parameters())))

        hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
        try:
            assert main(argv) == 0
        finally:
            hook.remove()
    return places


def test_sample_bench_and_eval_run_the_denoiser_on_the_accelerator(tmp_path, tiny_dirs, captioned_dir, capsys):
    """`fewstep sample`, `eval --model` and `bench` load where accelerate's device is (a GPU, where there is one) and
    run every network there: the SD student's pipeline (text encoder, UNet, VAE; bench's plain diffusers call too) and
    the digits teacher with its feature network."""
    from fewstep.commands.demo import ASSET_TEACHER

    run = tmp_path / "run"
    assert main(smoke_args("sd15_lcm", run, tiny_dirs, captioned_dir)) == 0
    final, digits = str(run / "final"), str(ASSET_TEACHER)
    for argv in (["sample", "--model", final, "--num", "2", "--steps", "1", "--out", str(tmp_path / "s.png")],
                 ["eval", "--model", digits, "--num", "16", "--steps", "1", "--reference", "digits"],
                 ["bench", "--teacher", digits, "--teacher-steps", "1", "--num", "8", "--repeats", "1", "--warmup", "1",
                  "--throughput-batch", "2", "--out", str(tmp_path / "bench_digits")],
                 ["bench", "--teacher", final, "--teacher-steps", "1", "--num", "2", "--repeats", "1", "--warmup", "1",
                  "--throughput-batch", "2", "--deploy-batches", "1", "--features", "inception",
                  "--reference", str(captioned_dir), "--out", str(tmp_path / "bench_sd")]):
        assert _under_device_rules_ran_on_the_accelerator(argv) == {"accelerator"}, argv


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_recipe_trains_under_cuda_device_rules(name, tmp_path, tiny_dirs, captioned_dir, capsys):
    """Opt-in (-m slow, about 5 minutes): each shipped recipe, smoke-sized, under the check (sharded ones as DDP)."""
    _train_under_device_rules(name, None, tmp_path, tiny_dirs, captioned_dir,
                              extra=("train.parallel=ddp",) if name in SHARDED else ())
