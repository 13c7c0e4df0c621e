"""Checkpoints (fewstep.checkpoint): atomic files, damaged ones skipped, and TrainState's exact round trip."""
import json

import pytest
import torch

from fewstep.checkpoint import TrainState, checkpoint_dirs, flatten_state, latest_intact, unflatten_state
from fewstep.config import validate
from fewstep.ema import EMA
from fewstep.errors import FewstepError
from fewstep.losses.base import DistillationLoss
from fewstep.run import run_recipe
from tests.test_loop import mlp_recipe


def test_damaged_checkpoint_is_skipped(tmp_path):
    out = tmp_path / "run"
    run_recipe(validate(mlp_recipe(out, keep_checkpoints=3)), log=lambda m: None)
    ckpts = checkpoint_dirs(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000003", "step-00000006"]
    blob = (ckpts[-1] / "student.safetensors").read_bytes()
    (ckpts[-1] / "student.safetensors").write_bytes(blob[:-10])
    messages = []
    assert latest_intact(out / "checkpoints", report=messages.append) == ckpts[0]
    assert "skipping damaged checkpoint step-00000006" in messages[0]


def test_flatten_and_unflatten_give_back_any_state_dict():
    """A nested optimizer-like state (tensors, tuples, ints as keys, inf) splits into JSON and tensors and back."""
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "max": float("inf")}]}
    skeleton, tensors = flatten_state(state, "optim")
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["param_groups"] == state["param_groups"]
    assert list(back["state"]) == [0] and all(torch.equal(back["state"][0][k], v) for k, v in state["state"][0].items())


def _run_state(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ema = EMA(list(net.parameters()), 0.9, warmup=True)
    state = TrainState(networks={"student": net}, optimizers={"student": opt}, lr_schedulers={"student": sched},
                       loss=DistillationLoss(), ema=ema, ema_names=[n for n, _ in net.named_parameters()])
    return net, opt, sched, ema, state


def test_train_state_restores_every_group_exactly(tmp_path):
    """Three steps saved, then restored into objects built from another seed: weights, buffers, AdamW moments,
    LR schedule, EMA averages and updates, counters and the torch RNG are all bit-identical."""
    net, opt, sched, ema, state = _run_state(0)
    for _ in range(3):
        net(torch.randn(5, 3)).square().mean().backward()
        opt.step(), sched.step(), opt.zero_grad()
        ema.update(list(net.parameters()))
        state.step += 1
        state.phase_steps["student"] += 1
    state.best = 0.25
    path = state.save(tmp_path / "checkpoints", keep=2)
    next_draw = torch.randn(4)
    net2, opt2, sched2, ema2, state2 = _run_state(1)
    state2.restore(path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert sched2.state_dict()["last_epoch"] == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert ema2.updates == 3 and all(torch.equal(a, b) for a, b in zip(ema.averages, ema2.averages))
    assert (state2.step, state2.phase_steps, state2.best) == (3, {"student": 3}, 0.25)
    assert torch.equal(torch.randn(4), next_draw)  # the RNG continues where the saved run was


def test_checkpoints_of_the_old_layout_are_refused_with_what_to_do(tmp_path):
    net, opt, sched, ema, state = _run_state(0)
    path = state.save(tmp_path / "checkpoints", keep=2)
    meta = json.loads((path / "state.json").read_text())
    del meta["state"]["format"]
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(FewstepError, match="before its loop redesign .format 1.*train.overwrite=true"):
        state.restore(path)
