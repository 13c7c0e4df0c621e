"""The shared loop: exact resume, accumulation, EMA, run directories, stages, LoRA, guards."""
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.checkpoint import checkpoint_dirs
from fewstep.cli import main
from fewstep.config import load_recipe, validate
from fewstep.data.plan import BatchSource
from fewstep.errors import FewstepError
from fewstep.losses import LOSSES
from fewstep.run import build_loop, run_recipe

DIGITS_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4, "num_class_embeds": 11,
}


def digits_recipe(out: Path, **train) -> dict:
    return {
        "name": "tiny_digits", "schedule": {"name": "vp"},
        "student": {"kind": "unet2d", "config": dict(DIGITS_UNET), "prediction_type": "epsilon"},
        "loss": {"name": "diffusion", "cond_drop_prob": 0.2},
        "data": {"name": "digits"},
        "optimizer": {"name": "AdamW", "lr": 0.003},
        "lr_scheduler": {"name": "cosine", "warmup_steps": 2},
        "sample": {"steps": 2, "num": 4, "guidance": 2.0},
        "train": {"output_dir": str(out), "max_steps": 12, "batch_size": 8, "checkpoint_every": 5, "ema_decay": 0.9,
                  "progress": False, "log_every": 4, **train},
    }


def mlp_recipe(out: Path, **train) -> dict:
    return {
        "name": "tiny_gmm", "schedule": {"name": "vp"},
        "student": {"kind": "mlp", "config": {"dim": 2, "hidden": 32, "depth": 2}, "precondition": "edm"},
        "loss": {"name": "diffusion"}, "data": {"name": "mixture", "size": 1000},
        "optimizer": {"name": "AdamW", "lr": 0.001}, "sample": {"steps": 4, "num": 16},
        "train": {"output_dir": str(out), "max_steps": 6, "batch_size": 16, "checkpoint_every": 3, "progress": False, **train},
    }


def final_weights(out: Path) -> dict:
    ckpt = checkpoint_dirs(out / "checkpoints")[-1]
    return {**load_file(str(ckpt / "student.safetensors")), **{f"ema.{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()},
            **{f"opt.{k}": v for k, v in load_file(str(ckpt / "optim.student.safetensors")).items()}}


def test_resume_after_sigterm_is_bit_identical(tmp_path):
    ref = validate(digits_recipe(tmp_path / "ref"))
    assert run_recipe(ref, log=lambda m: None).status == "finished"

    killed = validate(digits_recipe(tmp_path / "killed", eval_every=7))
    from fewstep.run import prepare_run_dir

    prepare_run_dir(killed)

    def kill(student, step):  # SIGTERM arrives during step 7: the loop checkpoints and stops
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    result = build_loop(killed, evaluate=kill, log=lambda m: None).run()
    assert result.status == "interrupted" and result.step == 7
    resumed = validate(digits_recipe(tmp_path / "killed"))
    assert run_recipe(resumed, log=lambda m: None).status == "finished"
    a, b = final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    fa = load_file(str(tmp_path / "ref/final/unet/diffusion_pytorch_model.safetensors"))
    fb = load_file(str(tmp_path / "killed/final/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("optimizer", [{"name": "SGD", "lr": 0.5}, {"name": "AdamW", "lr": 0.001}])
def test_accumulation_equals_large_batch(tmp_path, optimizer):
    def one_step(out, batch_size, grad_accum):
        raw = digits_recipe(out, max_steps=1, batch_size=batch_size, grad_accum=grad_accum)
        raw["optimizer"] = optimizer
        run_recipe(validate(raw), log=lambda m: None)
        return load_file(str(checkpoint_dirs(out / "checkpoints")[-1] / "student.safetensors"))

    big = one_step(tmp_path / "b16", 16, 1)
    acc = one_step(tmp_path / "b8x2", 8, 2)
    worst = max((big[k] - acc[k]).abs().max().item() for k in big)
    assert worst <= 1e-5, worst


def test_ema_equals_hand_computation(tmp_path):
    """With ``ema_warmup: false`` the decay is fixed from the first update: e = d e + (1 - d) p."""
    recipe = validate(digits_recipe(tmp_path / "ema", ema_decay=0.8, ema_warmup=False))
    loop = build_loop(recipe, log=lambda m: None)
    params = lambda: [p.detach().clone() for p in loop.student.net.parameters() if p.requires_grad]  # noqa: E731
    expected = params()
    source = BatchSource(loop.dataset, loop.plan)
    for _ in range(4):
        loop.train_step(source)
        expected = [0.8 * e + 0.2 * p for e, p in zip(expected, params())]
    worst = max((e - m).abs().max().item() for e, m in zip(expected, loop.ema.averages))
    assert worst < 1e-6, worst


def test_ema_warms_up_as_diffusers_emamodel_and_is_exported(tmp_path):
    """The default EMA follows diffusers' own EMAModel fed the same weights (decay 0 at the first update,
    then min(d, (1 + t) / (10 + t))), checkpointed and exported; a fixed decay from step 0 would still be
    0.99^6 = 94 % the initial weights."""
    from diffusers.training_utils import EMAModel

    n, d = 6, 0.99
    out = tmp_path / "ema"
    run_recipe(validate(digits_recipe(out, max_steps=n, ema_decay=d, checkpoint_every=1, keep_checkpoints=n + 1)),
               log=lambda m: None)
    steps = [load_file(str(out / f"checkpoints/step-{k:08d}/student.safetensors")) for k in range(n + 1)[1:]]
    names = sorted(steps[0])
    reference = EMAModel([torch.nn.Parameter(steps[0][k].clone()) for k in names], decay=d)
    for weights in steps:
        reference.step([torch.nn.Parameter(weights[k].clone()) for k in names])
    ema = load_file(str(out / f"checkpoints/step-{n:08d}/ema.safetensors"))
    assert max((ema[k] - r).abs().max().item() for k, r in zip(names, reference.shadow_params)) < 1e-6
    assert json.loads((out / f"checkpoints/step-{n:08d}/state.json").read_text())["state"]["ema_updates"] == n
    exported = load_file(str(out / "final/unet/diffusion_pytorch_model.safetensors"))
    assert max((exported[k.removeprefix("net.")] - ema[k]).abs().max().item() for k in names) < 1e-6
    # the check can fail: the fixed-decay average of the same weights is elsewhere
    init = build_loop(validate(digits_recipe(tmp_path / "init", ema_decay=d)), log=lambda m: None)
    fixed = {k: v.detach().clone() for k, v in init.student.net.named_parameters() if v.requires_grad}
    for weights in steps:
        fixed = {k: d * fixed[k] + (1 - d) * weights[k] for k in fixed}
    assert max((fixed[k] - ema[k]).abs().max().item() for k in names) > 1e-3


def test_loss_falls_and_samples_and_export(tmp_path, capsys):
    out = tmp_path / "gmm"
    run_recipe(validate(mlp_recipe(out, max_steps=60, log_every=10, sample_every=60)), log=lambda m: None)
    import json

    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "samples" / "step-00000060.png").exists()
    meta = json.loads((out / "final" / "fewstep.json").read_text())
    assert meta["kind"] == "mlp" and meta["sampler"]["steps"] == 4
    assert "# tiny_gmm" in (out / "final" / "README.md").read_text()
    target = tmp_path / "s.safetensors"
    assert main(["sample", "--model", str(out / "final"), "--num", "5", "--out", str(target)]) == 0
    assert load_file(str(target))["samples"].shape == (5, 2)
    assert main(["sample", "--model", str(out / "final"), "--num", "5", "--out", str(target)]) == 2  # no overwrite


def test_sample_class_conditional_unet(tmp_path):
    out = tmp_path / "dig"
    run_recipe(validate(digits_recipe(out, max_steps=2)), log=lambda m: None)
    st = tmp_path / "d.safetensors"
    assert main(["sample", "--model", str(out / "final"), "--num", "3", "--class", "7", "--steps", "2", "--out", str(st)]) == 0
    x = load_file(str(st))["samples"]
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert main(["sample", "--model", str(out / "final"), "--num", "3", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["sample", "--model", str(out / "final"), "--class", "12", "--out", str(tmp_path / "h.png")]) == 2
    from diffusers import DDIMScheduler, UNet2DModel

    UNet2DModel.from_pretrained(out / "final" / "unet")  # plain diffusers loads the components
    DDIMScheduler.from_pretrained(out / "final" / "scheduler")


def test_run_directory_rules(tmp_path, capsys):
    out = tmp_path / "run"
    run_recipe(validate(mlp_recipe(out)), log=lambda m: None)
    changed = mlp_recipe(out)
    changed["optimizer"]["lr"] = 0.01
    with pytest.raises(FewstepError, match=r"different recipe \(differs in optimizer.lr\)"):
        run_recipe(validate(changed), log=lambda m: None)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    longer = validate(mlp_recipe(out, max_steps=9))  # run-length keys may change: it resumes
    assert run_recipe(longer, log=lambda m: None).step == 9
    changed["train"]["overwrite"] = True
    assert run_recipe(validate(changed), log=lambda m: None).step == 6
    assert before  # there were checkpoints before the overwrite
    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FewstepError, match="not empty and holds no fewstep run"):
        run_recipe(validate(mlp_recipe(stranger)), log=lambda m: None)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_stages_chain_and_resume(tmp_path):
    raw = mlp_recipe(tmp_path / "chain")
    raw["stages"] = [
        {"name": "teacher", "train": {"max_steps": 3}},
        {"name": "student", "student": {"init": "path", "path": "stage:teacher"}, "train": {"max_steps": 2}},
    ]
    logs = []
    assert run_recipe(validate(raw), log=logs.append).status == "finished"
    assert (tmp_path / "chain/student/final/fewstep.json").exists()
    logs.clear()
    run_recipe(validate(raw), log=logs.append)
    assert "stage teacher already finished" in " ".join(logs)
    bad = dict(mlp_recipe(tmp_path / "bad"), stages=[{"name": "x", "student": {"init": "path", "path": "stage:nope"}}])
    with pytest.raises(FewstepError, match="no earlier stage named 'nope'"):
        run_recipe(validate(bad), log=lambda m: None)


def test_lora_trains_only_adapters(tmp_path):
    raw = digits_recipe(tmp_path / "lora", max_steps=3, ema_decay=None)
    raw["lora"] = {"rank": 2, "target_modules": ["to_q", "to_v"]}
    loop = build_loop(validate(raw), log=lambda m: None)
    before = {n: p.detach().clone() for n, p in loop.student.net.named_parameters()}
    trainable = [n for n, p in loop.student.net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loop.run()
    after = dict(loop.student.net.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in trainable)
    raw["lora"]["target_modules"] = ["to_qq"]
    with pytest.raises(FewstepError, match=r"'to_qq' matches no layer of UNet2DModel; valid: .*to_q"):
        build_loop(validate(raw), log=lambda m: None)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from fewstep.losses.diffusion import DiffusionLoss

    out = tmp_path / "nan"
    original = DiffusionLoss.forward

    def poisoned(self, phase, batch, student, teacher):
        result = original(self, phase, batch, student, teacher)
        if int(batch["seeds"][0]) % 1 == 0 and self._calls_seen >= 4:
            result.loss = result.loss * float("nan")
        self._calls_seen += 1
        return result

    monkeypatch.setattr(DiffusionLoss, "_calls_seen", 0, raising=False)
    monkeypatch.setattr(DiffusionLoss, "forward", poisoned)
    with pytest.raises(FewstepError, match="non-finite loss or gradient at step 4"):
        run_recipe(validate(mlp_recipe(out, max_steps=6)), log=lambda m: None)
    assert [c.name for c in checkpoint_dirs(out / "checkpoints")] == ["step-00000003"]
    monkeypatch.setattr(DiffusionLoss, "_calls_seen", 0, raising=False)
    result = run_recipe(validate(mlp_recipe(out, max_steps=6, nonfinite="skip", overwrite=True)), log=lambda m: None)
    assert result.status == "finished"


def test_loop_never_asks_which_loss_it_runs():
    from fewstep import loop

    source = Path(loop.__file__).read_text()
    names = set(LOSSES) | {cls.__name__ for cls in LOSSES.values()}
    for name in names:
        assert not re.search(rf"\b{re.escape(name)}\b", source), name
    assert "isinstance(self.loss" not in source and "type(self.loss)" not in source and "type(loss)" not in source
    assert load_recipe("gmm_teacher").loss["name"] in LOSSES


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    def one_step(out, gc):
        run_recipe(validate(digits_recipe(out, max_steps=1, gradient_checkpointing=gc)), log=lambda m: None)
        return load_file(str(checkpoint_dirs(out / "checkpoints")[-1] / "student.safetensors"))

    a, b = one_step(tmp_path / "plain", False), one_step(tmp_path / "gc", True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    with pytest.raises(FewstepError, match="MLPNet does not support it"):
        run_recipe(validate(mlp_recipe(tmp_path / "mlp", gradient_checkpointing=True)), log=lambda m: None)


def test_bf16_mixed_precision_runs_and_keeps_float32_master_weights(tmp_path):
    out = tmp_path / "bf16"
    result = run_recipe(validate(digits_recipe(out, max_steps=3, mixed_precision="bf16")), log=lambda m: None)
    assert result.status == "finished"
    weights = load_file(str(checkpoint_dirs(out / "checkpoints")[-1] / "student.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_one_ema_class_serves_the_loop_and_the_consistency_target():
    """fewstep.ema.EMA: with warm-up the update after t others uses ema_decay(d, t) (diffusers' EMAModel rule),
    without it d from the first update (LCM's target); averages may be a network's own parameters; swap_in
    loads the averages and restores the weights."""
    from fewstep.ema import EMA, ema_decay

    g = torch.Generator().manual_seed(0)
    w = [torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    ema = EMA(w, 0.9, warmup=True)
    expected = [t.clone() for t in w]
    for t in range(5):
        new = [torch.randn(x.shape, generator=g) for x in w]
        d = ema_decay(0.9, t, True)
        expected = [d * e + (1 - d) * n for e, n in zip(expected, new)]
        ema.update(new)
    assert ema.updates == 5 and all(torch.allclose(a, e, atol=1e-6) for a, e in zip(ema.averages, expected))
    target = [torch.zeros(3)]
    fixed = EMA([], 0.95, averages=target)
    fixed.update([torch.ones(3)])
    assert torch.allclose(target[0], torch.full((3,), 0.05))  # in place, decay 0.95 from the first update
    before = [x.clone() for x in w]
    with ema.swap_in(w):
        assert all(torch.equal(x, a) for x, a in zip(w, ema.averages))
    assert all(torch.equal(x, b) for x, b in zip(w, before))
