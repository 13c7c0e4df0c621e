"""LoRA with every loss: only adapters train, the export is a diffusers-format LoRA that plain diffusers
loads onto the base pipeline and samples exactly as fewstep did; fuse / unfuse and `fewstep lora fuse`."""
import pytest
import torch

from fewstep.config import validate
from fewstep.errors import FewstepError

PROMPT = "a red bicycle"
LORA = {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "init": "default"}


def _recipe(tmp_path, tiny_sd, captioned_dir, loss, pairs_made=True, **lora):
    raw = {"name": f"lora_{loss}", "teacher": {"kind": "pipeline", "path": str(tiny_sd)},
           "student": {"kind": "pipeline", "init": "teacher"}, "lora": {**LORA, **lora},
           "optimizer": {"name": "AdamW", "lr": 1e-2},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 2, "progress": False,
                     "sample_every": 0}}
    if loss == "consistency":
        raw.update(loss={"name": "consistency", "target": "online", "num_timesteps": 10},
                   data={"name": "images", "root": str(captioned_dir), "resolution": 32},
                   sample={"solver": "consistency", "spacing": "lcm", "steps": 1, "num": 1})
    elif loss == "fdistill":
        raw.update(loss={"name": "fdistill", "divergence": "reverse_kl", "guidance": 1.75, "fake_updates": 1,
                         "fake_init": "teacher_lora", "fake_lora_rank": 4},
                   data={"name": "prompts"}, sample={"solver": "renoise", "spacing": "trailing", "steps": 1, "num": 1})
    else:  # reflow on teacher pairs, the student read as a flow (InstaFlow)
        raw["student"]["schedule"] = "flow"
        data = {"name": "pairs", "path": str(tmp_path / "run" / "pairs")} if pairs_made else {"name": "prompts"}
        raw.update(loss={"name": "reflow"}, data=data,
                   pairs={"num": 4, "shard_size": 2, "batch_size": 2, "solver": "ddim", "steps": 2, "guidance": 1.5},
                   sample={"solver": "euler", "steps": 1, "num": 1})
    return validate(raw)


def _estimate_rows(text):
    """--dry-run's memory-estimate rows: label -> GiB."""
    import re

    return {m.group(1).strip(): float(m.group(2))
            for m in re.finditer(r"^  (.+?)\s+[\d,]+ trainable\s+([\d.]+) GiB", text, re.M)}


def _plain_sample(final, base):
    """The LoRA in plain diffusers: base pipeline + load_lora_weights + the exported scheduler, seed-0 latents."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(final)
    cls = getattr(diffusers, (final / "scheduler" / "scheduler_config.json").read_text().split('"_class_name": "')[1].split('"')[0])
    pipe.scheduler = cls.from_pretrained(final / "scheduler")
    return pipe, lambda: _one_step(pipe)


def _one_step(pipe):
    size = pipe.unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):  # the SD pipeline has no flow loop: docs/reflow.md's lines
        emb, _ = pipe.encode_prompt([PROMPT], "cpu", 1, False)
        pipe.scheduler.set_timesteps(1)
        with torch.no_grad():
            for t in pipe.scheduler.timesteps:
                latents = pipe.scheduler.step(pipe.unet(latents, t, encoder_hidden_states=emb).sample, t, latents).prev_sample
            return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    return pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="pt").images * 2 - 1


@pytest.mark.parametrize("loss", ["consistency", "fdistill", "reflow"])
def test_lora_run_trains_only_adapters_and_loads_in_plain_diffusers(loss, tmp_path, tiny_dirs, captioned_dir):
    from safetensors.torch import load_file

    from fewstep.export import read_meta
    from fewstep.generate import Generator
    from fewstep.pipelines import load_pipeline
    from fewstep.run import build_loop, run_pairs

    if loss == "reflow":  # teacher pairs on prompts first
        run_pairs(_recipe(tmp_path, tiny_dirs["sd"], captioned_dir, loss, pairs_made=False), progress=False, log=lambda m: None)
    recipe = _recipe(tmp_path, tiny_dirs["sd"], captioned_dir, loss)
    loop = build_loop(recipe, log=lambda m: None)
    net = loop.student.net
    base_before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}
    teacher_before = {n: p.detach().clone() for n, p in loop.teacher.net.named_parameters() if "lora_" not in n}
    assert lora_before and all(p.requires_grad == ("lora_" in n) for n, p in net.named_parameters())
    assert loop.run().status == "finished"
    after = dict(net.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())  # bit-identical base
    assert any(not torch.equal(after[n], p) for n, p in lora_before.items())  # the adapters moved
    teacher_after = dict(loop.teacher.net.named_parameters())
    assert all(torch.equal(teacher_after[n], p) for n, p in teacher_before.items())
    if loss == "fdistill":  # the fake score lives as adapters on the frozen teacher and trained
        assert any("fake_score" in n for n in teacher_after)

    final = tmp_path / "run" / "final"
    meta = read_meta(final)
    assert meta["kind"] == "lora" and meta["base"] == str(tiny_dirs["sd"].resolve())
    assert not (final / "unet").exists()  # the LoRA file only, no second copy of the base
    state = load_file(final / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") for k in state) and len(state) == len(lora_before)

    # fewstep's own sample from the trained (adapter-carrying) network; text encoder and VAE from the base
    mine = Generator(loop.student.eval(), meta, load_pipeline(str(tiny_dirs["sd"])))(1, seed=0, prompts=[PROMPT])
    pipe, plain = _plain_sample(final, tiny_dirs["sd"])
    lora_params = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    assert len(lora_params) == len(state)  # every key of the file became a parameter: nothing left unloaded
    image = plain()
    assert torch.allclose(mine, image, atol=1e-5), (mine - image).abs().max()

    # fuse then unfuse round-trips; fused samples equal the adapter samples
    w0 = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    pipe.fuse_lora()
    assert torch.allclose(plain(), image, atol=1e-5)
    pipe.unfuse_lora()
    w1 = dict(pipe.unet.named_parameters())
    assert all(torch.allclose(w1[n], p, atol=1e-6) for n, p in w0.items())

    # fewstep's own loader (base + LoRA, fused) samples the same
    again = Generator.load(str(final))(1, seed=0, prompts=[PROMPT])
    assert torch.allclose(again, image, atol=1e-5)


def test_lora_base_dtype_stores_the_frozen_base_in_half_and_trains_as_the_float32_base_does(tmp_path, tiny_dirs,
                                                                                              captioned_dir, capsys):
    """lora.base_dtype: bfloat16 keeps the student's frozen base in bfloat16 (bit-identical through training) and its
    adapters in float32; three AdamW steps move the adapters as the float32 base's run does (cosine > 0.9; 0.97
    measured); the exported file holds the float32 adapters; --dry-run's estimate drops by exactly 2 bytes per frozen
    parameter."""
    import re

    from safetensors.torch import load_file

    from fewstep.cli import main
    from fewstep.run import build_loop

    deltas = {}
    for dtype in (None, "bfloat16"):
        out = tmp_path / str(dtype)
        recipe = _recipe(out, tiny_dirs["sd"], captioned_dir, "consistency", **({"base_dtype": dtype} if dtype else {}))
        loop = build_loop(recipe, log=lambda m: None)
        net = loop.student.net
        params = dict(net.named_parameters())
        base = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
        before = {n: p.detach().clone() for n, p in params.items() if "lora_" in n}
        want = torch.bfloat16 if dtype else torch.float32
        assert all(p.dtype == want and not params[n].requires_grad for n, p in base.items())
        assert all(p.dtype == torch.float32 and params[n].requires_grad for n, p in before.items())
        assert loop.run().status == "finished"
        assert all(torch.equal(params[n], p) for n, p in base.items())
        deltas[dtype] = torch.cat([(params[n].detach() - p).flatten() for n, p in before.items()])
        state = load_file(out / "run" / "final" / "pytorch_lora_weights.safetensors")
        assert state and all(v.dtype == torch.float32 for v in state.values())
    a, b = deltas[None], deltas["bfloat16"]  # Adam's first steps are near lr * sign(g): bf16's rounding flips a few
    assert float(b.norm()) > 0.5 * float(a.norm()) and float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9

    gib = {}
    for dtype in ("float32", "bfloat16"):
        over = [f"teacher.path={tiny_dirs['sd']}", f"data.root={captioned_dir}", "lora.rank=4",
                f"lora.base_dtype={dtype}", f"train.output_dir={tmp_path / 'dry'}"]
        assert main(["distill", "sd15_lcm", "--dry-run", *over]) == 0
        text = capsys.readouterr().out
        gib[dtype] = _estimate_rows(text)
        frozen = int(re.search(r"student: [\d,]+ trainable, ([\d,]+) frozen", text).group(1).replace(",", ""))
    assert gib["float32"]["this run"] - gib["bfloat16"]["this run"] == pytest.approx(2 * frozen / 2**30, abs=2e-3)
    assert gib["float32"]["full student instead of LoRA"] == gib["bfloat16"]["full student instead of LoRA"]
    with pytest.raises(FewstepError, match="lora.base_dtype.*valid: float32, float16, bfloat16"):
        _recipe(tmp_path, tiny_dirs["sd"], captioned_dir, "consistency", base_dtype="fp8")


def test_lora_fuse_writes_a_full_pipeline_that_samples_the_same(tmp_path, tiny_dirs, captioned_dir, capsys):
    from diffusers import StableDiffusionPipeline

    from fewstep.cli import main
    from fewstep.export import read_meta
    from fewstep.run import build_loop

    recipe = _recipe(tmp_path, tiny_dirs["sd"], captioned_dir, "fdistill")
    assert build_loop(recipe, log=lambda m: None).run().status == "finished"
    final = tmp_path / "run" / "final"
    _, plain = _plain_sample(final, tiny_dirs["sd"])
    image = plain()
    out = tmp_path / "fused"
    assert main(["lora", "fuse", str(final), "--out", str(out)]) == 0
    assert read_meta(out)["kind"] == "pipeline" and not (out / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora_" in n for n, _ in pipe.unet.named_parameters())
    assert torch.allclose(_one_step(pipe), image, atol=1e-5)
    # nothing is overwritten; a full pipeline is not a LoRA
    capsys.readouterr()
    assert main(["lora", "fuse", str(final), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["lora", "fuse", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "not a LoRA" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_lora_parameter_count_matches_peft_and_dry_run_compares_full_and_lora(tiny_dirs, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from fewstep.cli import main
    from fewstep.lora import inject_lora
    from fewstep.memory import estimate, lora_parameter_count

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]
    unet = UNet2DConditionModel.from_pretrained(tiny_dirs["sd"], subfolder="unet")
    expected = lora_parameter_count(unet, 4, targets)
    frozen = sum(p.numel() for p in unet.parameters())
    inject_lora(unet, rank=4, alpha=None, target_modules=targets)
    assert expected == sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    est = estimate([unet, unet], optimizer="AdamW")  # shared tensors count once
    assert (est.trainable, est.frozen) == (expected, frozen)
    assert est.bytes == frozen * 4 + expected * 4 + expected * 12

    over = [f"teacher.path={tiny_dirs['sd']}", "loss.fake_lora_rank=4", f"train.output_dir={tmp_path / 'x'}"]
    assert main(["distill", "sd15_dmd", "--dry-run", *over]) == 0
    out = capsys.readouterr().out
    gib = _estimate_rows(out)
    assert gib["fake score as LoRA rank 4 on the teacher (fake_init: teacher_lora)"] < gib["this run"]
    assert gib["LoRA rank 64 student instead of full"] != gib["this run"] and not (tmp_path / "x").exists()


def test_lora_on_a_lora_student_chains_base_loras(tmp_path, tiny_dirs, captioned_dir):
    """Fine-tuning a base + distillation-LoRA student: it loads fused, a new LoRA trains on top, and the
    export names the distillation LoRA as a base LoRA; plain diffusers (load + fuse the first, load the
    second) reproduces fewstep's sample."""
    from fewstep.export import read_meta
    from fewstep.generate import Generator
    from fewstep.run import build_loop

    first = _recipe(tmp_path / "a", tiny_dirs["sd"], captioned_dir, "consistency")
    assert build_loop(first, log=lambda m: None).run().status == "finished"
    distilled = tmp_path / "a" / "run" / "final"
    raw = {**first.raw, "student": {"kind": "pretrained", "path": str(distilled)}, "teacher": {"kind": "none"},
           "loss": {"name": "consistency", "solver": "data", "target": "online", "num_timesteps": 10},
           "train": {**first.raw["train"], "output_dir": str(tmp_path / "b")}}
    assert build_loop(validate(raw), log=lambda m: None).run().status == "finished"
    final = tmp_path / "b" / "final"
    meta = read_meta(final)
    assert meta["kind"] == "lora" and meta["base_loras"] == [str(distilled / "pytorch_lora_weights.safetensors")]
    ours = Generator.load(str(final))(1, seed=0, prompts=[PROMPT])

    import diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dirs["sd"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(distilled)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(final)
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(final / "scheduler")
    assert torch.allclose(_one_step(pipe), ours, atol=1e-5)


@pytest.mark.parametrize("name", ["sd15_lcm_lora", "sd15_fdistill_lora", "sdxl_lcm_lora"])
def test_plain_diffusers_loads_every_adapter_of_the_recipes_lora_targets(name, tmp_path, tiny_dirs, captioned_dir):
    """The recipe's targets (attention, feed-forward, resnet convs and shortcuts, down/upsamplers, time embedding)
    all reach plain diffusers' network: as many LoRA tensors as were trained, and (SD) the same UNet output as the
    trained network. A file with diffusers-renamed attention keys loaded 120 of 216 (peft warned, nothing failed)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    from fewstep.build import build
    from fewstep.config import load_recipe
    from fewstep.testing.recipes import family_of, standin_overrides
    from fewstep.testing.tiny import TINY_RESOLUTION

    over = standin_overrides(name, pipelines=tiny_dirs, images=captioned_dir, resolution=TINY_RESOLUTION,
                             lpips_weights=None)
    recipe = load_recipe(name, over + [f"train.output_dir={tmp_path / 'run'}", "train.mixed_precision='no'",
                                       "train.teacher_dtype=float32", "train.gradient_checkpointing=false"])
    b = build(recipe)
    net = b.student.denoiser.net
    torch.manual_seed(0)
    for n, p in net.named_parameters():
        if "lora_B" in n:  # zero at init: give every adapter an effect
            p.data.normal_(std=0.02)
    trained = get_peft_model_state_dict(net)
    b.export(b.student.denoiser, tmp_path / "final")
    cls = {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}[family_of(name)]
    pipe = cls.from_pretrained(tiny_dirs[family_of(name)])
    pipe.load_lora_weights(tmp_path / "final")
    adapter = list(pipe.unet.peft_config)[-1]
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    assert len(loaded) == len(trained) > 0
    assert {k.split(".lora_")[0] for k in loaded} == {k.split(".lora_")[0] for k in trained}
    if family_of(name) == "sd":
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ours = net(x, 500, encoder_hidden_states=text).sample
            theirs = pipe.unet(x, 500, encoder_hidden_states=text).sample
            base = diffusers.UNet2DConditionModel.from_pretrained(tiny_dirs["sd"], subfolder="unet")(
                x, 500, encoder_hidden_states=text).sample
        assert (ours - base).abs().max() > 1e-3  # the adapters change the output, so the comparison can fail
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_lora_adapters_start_from_the_run_seed_whatever_the_global_rng(tiny_dirs):
    """The adapters' random matrices come from the seed alone (they once came from the global RNG, so a 2-process
    run started other adapters than a 1-process one), and drawing them leaves the global RNG as it was."""
    from diffusers import UNet2DConditionModel

    from fewstep.lora import inject_lora

    def adapters(global_seed: int, seed: int) -> dict:
        torch.manual_seed(global_seed)
        unet = UNet2DConditionModel.from_pretrained(tiny_dirs["sd"], subfolder="unet")
        inject_lora(unet, rank=4, alpha=None, target_modules=["to_q", "to_k"], seed=seed)
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))  # the global stream did not move
        return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_A" in n}

    a, b, c = adapters(0, seed=7), adapters(123, seed=7), adapters(0, seed=8)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert all(not torch.equal(a[n], c[n]) for n in a)  # the seed does decide them


def test_a_merged_export_of_a_half_precision_base_is_written_at_the_adapters_precision():
    """merged_network on a LoRA MLP whose base is stored in bfloat16 (lora.base_dtype): a float32 network equal to the
    adapter-carrying one widened to float32 (the bfloat16 base values, the float32 adapters), not one rounded to
    bfloat16 after the merge."""
    import copy

    from fewstep.build.models import cast_frozen
    from fewstep.denoisers import MLPNet
    from fewstep.lora import inject_lora
    from fewstep.lora_io import merged_network

    torch.manual_seed(0)
    net = MLPNet(dim=2, hidden=32, depth=2)
    inject_lora(net, rank=4, alpha=None, target_modules=["blocks.0.1", "blocks.1.1"], init="default")
    for n, p in net.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    cast_frozen(net, "bfloat16")
    merged = merged_network(net)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    x, c = torch.randn(16, 2), torch.randn(16)
    wide = copy.deepcopy(net).float()
    wide.freqs.copy_(merged.freqs)  # a non-persistent buffer: the export rebuilds it exactly, not from its bf16 copy
    with torch.no_grad():
        want = wide(x, c)
        got = merged(x, c)
        rounded = merged_network(copy.deepcopy(wide).to(torch.bfloat16)).float()(x, c)
    assert torch.allclose(got, want, atol=1e-5)
    assert (rounded - want).abs().max() > 1e-3  # merging at bfloat16 would have rounded the update away
