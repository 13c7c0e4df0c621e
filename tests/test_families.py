"""The family x loss matrix (issue 23): every loss over every flow-transformer family, two optimizer steps on the tiny
fixtures, exported, and sampled again by plain diffusers (the family's pipeline class, the exported scheduler; LoRA
cells through ``load_lora_weights`` on the base) from the same latents and step noise: equal to fewstep's own sample
to 1e-5. docs/families.md lists the cells, the ones that do not apply and why, and which run by default."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fewstep.config import validate

PROMPT = "a red bicycle"
LORA = {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "init": "default"}
#: the size the tiny transformers run at (16 x 16 latents; FLUX.1: 64 tokens)
SIZE = 32
CELLS = ("reflow", "flow_distill", "lcm", "lcm_lora", "dmd", "dmd_lora", "dmd_gan", "scm", "rcm_lora")
#: fixtures (fewstep.testing.tiny): sd35 loads as family sd3 (QK-norm, a dual-attention layer), flux_schnell as flux
FAMILIES = ("sd", "sdxl", "sd3", "sd35", "flux", "flux_schnell")
VP = ("sd", "sdxl")
#: cells that do not apply, and why (docs/families.md)
NOT_APPLICABLE = {
    (f, c): "the SD pipelines have no flow-matching loop: an InstaFlow student samples through docs/reflow.md's manual "
            "loop (tests/test_lora.py, reflow)" for f in VP for c in ("reflow", "flow_distill")}
#: cells marked slow (opt-in); every other cell runs in the default suite (all of them: about 15 s on 2 cores)
SLOW: set[tuple[str, str]] = set()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_dirs):
    """conftest's tiny pipelines (sd, sdxl, sd3, sd35, flux: built once per session) plus flux_schnell."""
    from fewstep.testing.tiny import save_tiny_pipeline

    schnell = save_tiny_pipeline("flux_schnell", tmp_path_factory.mktemp("families") / "flux_schnell")
    return {**tiny_dirs, "flux_schnell": schnell}


def _recipe(tmp_path, family, base, captioned_dir, cell: str, *, pairs_made: bool = True) -> dict:
    raw = {"name": f"matrix_{cell}", "teacher": {"kind": "pipeline", "path": str(base), "resolution": SIZE},
           "student": {"kind": "pipeline", "init": "teacher"}, "optimizer": {"name": "AdamW", "lr": 1e-3},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "progress": False,
                     "sample_every": 0}}
    if cell.endswith("_lora"):
        raw["lora"] = LORA
    if cell in ("reflow", "flow_distill"):  # teacher pairs first (Euler on the pipeline's own grid)
        data = {"name": "pairs", "path": str(tmp_path / "run" / "pairs")} if pairs_made else {"name": "prompts"}
        raw.update(data=data, pairs={"num": 4, "shard_size": 2, "batch_size": 2, "solver": "euler", "steps": 2},
                   loss={"name": "reflow"} if cell == "reflow" else {"name": "flow_distill", "steps": 1, "distance": "l2"},
                   sample={"solver": "euler", "steps": 1, "num": 1})
    elif cell.startswith("lcm"):  # VP: LCM's boundary (timestep_scaling 10) and grid; flow: FlowMatchLCMScheduler's
        vp = family in VP
        raw.update(loss={"name": "consistency", "target": "online", "num_timesteps": 10, "guidance_min": 2.0,
                         "guidance_max": 2.0, "timestep_scaling": 10.0 if vp else 1000.0},
                   data={"name": "images", "root": str(captioned_dir), "resolution": SIZE},
                   sample={"solver": "consistency", "steps": 2, "num": 1, "spacing": "lcm" if vp else None,
                           # FLUX.1 [dev]'s student takes w as an input: it samples at the w it trained at
                           "guidance": 2.0 if family == "flux" else None})
    elif cell in ("scm", "rcm_lora"):  # continuous-time consistency (TrigFlow view, JVP through the student); SD: one
        # and two steps (LCMScheduler called with the TrigFlow grid's timesteps), flow transformers: one (below)
        scm = {"guidance_min": 2.0, "guidance_max": 2.0, "tangent_warmup_steps": 1}
        loss = {"name": "scm", **scm}
        if cell == "rcm_lora":  # rCM: sCM plus DMD on a LoRA student, the fake score as adapters on the teacher
            loss = {"name": "rcm", "scm": scm, "dmd": {"guidance": 2.0, "fake_updates": 1, "fake_init": "teacher_lora",
                                                      "fake_lora_rank": 4}}
        raw.update(loss=loss,
                   data={"name": "images", "root": str(captioned_dir), "resolution": SIZE},
                   sample={"solver": "renoise", "spacing": "trigflow", "steps": 2 if family in VP else 1, "num": 1})
    else:  # DMD: reverse-KL f-distill on prompts; the fake score a copy (full) or adapters on the teacher (LoRA)
        loss = {"name": "fdistill", "divergence": "reverse_kl", "guidance": 2.0, "fake_updates": 1}
        if cell == "dmd_lora":
            loss.update(fake_init="teacher_lora", fake_lora_rank=4)
        data = {"name": "prompts"}
        if cell == "dmd_gan":  # DMD2's GAN term on real images: a head on the frozen teacher's features
            loss.update(gan_weight=0.03)
            data = {"name": "images", "root": str(captioned_dir), "resolution": SIZE}
        raw.update(loss=loss, data=data,
                   sample={"solver": "renoise", "steps": 2, "num": 1, "spacing": "trailing" if family in VP else None})
    return raw


def _plain_diffusers_sample(final, meta: dict, steps: int, schedule, seed: int = 0) -> tuple[torch.Tensor, Any]:
    """The exported student sampled by plain diffusers: the pipeline class from_pretrained (a LoRA: its base plus
    load_lora_weights), the exported scheduler, fewstep's seed-``seed`` latents and its solver's noise seed: (image in
    [-1, 1], the pipeline)."""
    import diffusers

    from fewstep.denoisers.flux import pack
    from fewstep.export import pipeline_call
    from fewstep.pipelines import FAMILIES as FAMILY_OF

    index = json.loads(((final if meta["kind"] != "lora" else Path(meta["base"])) / "model_index.json").read_text())
    no_t5 = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k, [None])[0] is None and k in index}
    if meta["kind"] == "lora":
        pipe = getattr(diffusers, meta["pipeline_class"]).from_pretrained(meta["base"], **no_t5)
        pipe.load_lora_weights(final)
        cls = json.loads((final / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        pipe.scheduler = getattr(diffusers, cls).from_pretrained(final / "scheduler")
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(final, **no_t5)  # SD3 without its T5, as saved
    pipe.set_progress_bar_config(disable=True)
    family = FAMILY_OF[type(pipe).__name__]
    kwargs, why = pipeline_call(meta, steps, family, schedule)
    assert kwargs is not None, why
    latents = torch.randn(1, *meta["sample_shape"], generator=torch.Generator().manual_seed(seed))
    if family == "flux":
        latents = pack(latents)
    torch.manual_seed(seed + 1)  # SD3's and FLUX.1's pipelines pass no generator to scheduler.step: a multistep
    # sampler's re-noising draws from torch's global generator, here seeded as fewstep's solver generator is (the SD
    # pipelines pass theirs, which latents given leaves to the steps)
    out = pipe(PROMPT, latents=latents, output_type="pt", generator=torch.Generator().manual_seed(seed + 1),
               **kwargs).images
    return out * 2 - 1, pipe


def _run_cell(family, cell, tmp_path, family_dirs, captioned_dir):
    from fewstep.export import read_meta
    from fewstep.generate import Generator
    from fewstep.run import build_loop, run_pairs

    base = family_dirs[family]
    if cell in ("reflow", "flow_distill"):
        run_pairs(validate(_recipe(tmp_path, family, base, captioned_dir, cell, pairs_made=False)), progress=False,
                  log=lambda m: None)
    loop = build_loop(validate(_recipe(tmp_path, family, base, captioned_dir, cell)), log=lambda m: None)
    before = {n: p.detach().clone() for n, p in loop.student.net.named_parameters() if p.requires_grad}
    assert before and loop.run().status == "finished"
    after = dict(loop.student.net.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())  # two steps moved the trained weights
    if cell.endswith("_lora"):
        assert all("lora_" in n for n in before)
    final = tmp_path / "run" / "final"
    meta = read_meta(final)
    assert meta["kind"] == ("lora" if cell.endswith("_lora") else "pipeline") and meta["resolution"] == SIZE
    gen = Generator.load(str(final))
    results = {}
    for steps in sorted({1, meta["sampler"]["steps"]}):
        ours = gen(1, seed=0, steps=steps, prompts=[PROMPT])
        plain, pipe = _plain_diffusers_sample(final, meta, steps, gen.denoiser.schedule)
        assert ours.shape == plain.shape == (1, 3, SIZE, SIZE)
        results[steps] = (ours - plain).abs().max().item()
        torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)
    return loop, meta, pipe, results


@pytest.mark.parametrize("family,cell", [
    pytest.param(f, c, marks=pytest.mark.slow if (f, c) in SLOW else ()) for f in FAMILIES for c in CELLS
    if (f, c) not in NOT_APPLICABLE])
def test_every_loss_over_every_family_exports_what_fewstep_samples(family, cell, tmp_path, family_dirs, captioned_dir):
    loop, meta, pipe, _ = _run_cell(family, cell, tmp_path, family_dirs, captioned_dir)
    if cell == "dmd_gan":
        disc = type(loop.loss.discriminator).__name__
        assert disc == ("FeatureDiscriminator" if family in VP else "TokenFeatureDiscriminator")
    if family in VP:
        expected = "LCMScheduler"
    else:
        expected = "FlowMatchLCMScheduler" if cell.startswith(("lcm", "dmd", "scm", "rcm")) else "FlowMatchEulerDiscreteScheduler"
    assert type(pipe.scheduler).__name__ == expected
    if family == "flux":
        assert pipe.scheduler.config.use_dynamic_shifting  # the student keeps FLUX.1's resolution-dependent grid
    if family in ("sd35", "flux_schnell"):  # the fixture's own shape survived the export
        net = pipe.transformer
        assert (net.config.qk_norm == "rms_norm" and net.config.dual_attention_layers == [0] if family == "sd35"
                else not net.config.guidance_embeds)


def test_the_token_discriminator_reads_each_patch_where_fluxpipeline_places_it(family_dirs):
    """TokenFeatureDiscriminator lays FLUX.1's middle-block image tokens out on the patch grid: token k lands at the
    (row, column) FluxPipeline's _prepare_latent_image_ids gives it."""
    from diffusers import FluxPipeline

    from fewstep.discriminators import TokenFeatureDiscriminator, transformer_blocks
    from fewstep.pipelines import load_pipeline

    lp = load_pipeline(str(family_dirs["flux"]), resolution=SIZE)
    den = lp.denoiser()
    disc = TokenFeatureDiscriminator(den)
    seen = {}
    transformer_blocks(den.net)[disc.block].register_forward_hook(lambda m, i, o: seen.update(tokens=o[1]))
    grids = {}
    disc.head[0].register_forward_hook(lambda m, i, o: grids.update(grid=i[0]))
    x = torch.randn(2, *lp.sample_shape)
    logits = disc(x, torch.tensor([500.0, 900.0]), lp.encode_prompts(["a cat", "a dog"]))
    assert logits.shape == (2,) and disc.block == 1  # tiny FLUX.1: one joint + one single block, the middle is 1
    ids = FluxPipeline._prepare_latent_image_ids(2, 8, 8, x.device, torch.float32).long()
    expected = torch.zeros_like(grids["grid"])
    for k, (_, r, c) in enumerate(ids.tolist()):
        expected[:, :, r, c] = seen["tokens"][:, k].float()
    torch.testing.assert_close(grids["grid"], expected, rtol=0, atol=0)


def test_a_flow_consistency_student_lcms_boundary_cannot_export_is_refused_before_training(tmp_path, family_dirs,
                                                                                      captioned_dir, capsys):
    """LCM's timestep_scaling 10 on a FLUX.1 student: FlowMatchLCMScheduler (the export) has no c_skip, so the run is
    refused with one line and exit code 2 before anything is written."""
    import yaml

    from fewstep.cli import main

    raw = _recipe(tmp_path, "flux", family_dirs["flux"], captioned_dir, "lcm")
    raw["loss"]["timestep_scaling"] = 10.0
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.timestep_scaling 10.0" in err[0] and "FlowMatchLCMScheduler" in err[0]
    assert "use 1000 or more" in err[0] and not (tmp_path / "run").exists()
