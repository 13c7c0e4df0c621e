"""GPU rehearsal: every SD-family recipe (sd15_*, sdxl_*, sd3_*, sd35_*, flux_*; DMD at 1 and 4 generator steps) trains
a few steps at the published architecture sizes, and each stage reports its step time per phase and its peak CUDA
memory; the precision check, one save / resume / export and one single-process fsdp run come first.

    bash benchmarks/gpu_rehearsal_wheels.sh        # here: .whl/ with diffusers and fewstep (the GPU image has neither)
    python benchmarks/gpu_rehearsal.py [--budget 280] [--guard 30] [--recipes sd15_dmd,...] [--out gpu_rehearsal.json]

With CUDA: pipelines with random weights are built on the GPU from the configs below (SD 1.5, SDXL base, SD3
medium and SD 3.5 Medium without their T5 encoder: no tokenizer files offline, and diffusers runs SD3 with zeros in
its place; FLUX.1 [dev] at 11.9B with T5-XXL, its tokenizer fewstep's small Unigram one), saved in float16 (FLUX.1:
bfloat16, as it ships) under /dev/shm and loaded by path, as users load theirs, and every recipe runs against them
with its own per-GPU batch, dtypes and resolution. flux_dmd (12B student and fake score: 378 GiB before
activations) and sd35_fdistill (80 GB) need FSDP over 8 GPUs; one GPU rehearses their LoRA variants at the per-GPU
batch (flux_dmd@lora, also with the LoRA student's frozen base in bfloat16: lora.base_dtype; sd35_fdistill@lora),
and sdxl_lcm_lora@bf16_base times SDXL's LCM-LoRA that way. Without CUDA (or with --tiny): the same code on the
test suite's tiny pipelines at batch 2 in float32 (tests/test_gpu_rehearsal.py, `pytest -m slow`).

In order: the precision check (benchmarks/precision.py on the SD 1.5 stand-in's UNet: sd15_fdistill_js's GAN gradient
through the frozen teacher in float16 and bfloat16 against float32, at batch 8 and 512 px); sd15_lcm_lora trained 2
steps with a checkpoint at each, resumed to step 3, exported, and the export loaded and sampled; then every recipe,
SD 1.5 and SDXL first and FLUX.1 last, with sd15_lcm@fsdp (train.parallel fsdp on one process: its own NCCL
group). Pairs stages make one batch of pairs with the recipe's solver and steps (pairs/s); training stages build
the recipe's loop and time ``train_step`` until every phase has run twice (its first step, which warms up kernels
and allocators, is not counted) or the stage's guard runs out; a non-finite logged value stops the stage as an
error. A stage whose student is an earlier stage's model starts from the teacher instead (same architecture). No
stage starts after --budget seconds (each is reported "not run (budget)"). The report (--out) is rewritten
atomically after every row: a killed run leaves every finished row on disk.

Then (unless --no-latency) one-step latency: SD 1.5 at 512 px and SDXL at 1024 px in float16, the pipeline called
plainly, with its UNet uncompiled and then compiled per block (train.compile's regional compilation); the
compile's warm-up time is reported apart. sd15_lcm@compile and sdxl_lcm_lora@compile time the training step with
train.compile beside the same recipes uncompiled.
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
             "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
SD3_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                   "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}
#: SD 3.5 Medium's MMDiT-X (stabilityai/stable-diffusion-3.5-medium transformer/config.json; diffusers infers the same
#: from the checkpoint in scripts/convert_sd3_to_diffusers.py): qk RMSNorm, dual attention in its first 13 blocks
SD35_TRANSFORMER = {**SD3_TRANSFORMER, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                    "dual_attention_layers": list(range(13))}
VAE = {"in_channels": 3, "out_channels": 3, "layers_per_block": 2, "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
VAE_BY_FAMILY = {"sd": {"latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
                 "sdxl": {"latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025},
                 "sd3": {"latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                         "use_quant_conv": False, "use_post_quant_conv": False},
                 "sd35": {"latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                          "use_quant_conv": False, "use_post_quant_conv": False},
                 "flux": {"latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                          "use_quant_conv": False, "use_post_quant_conv": False}}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
          "projection_dim": 1280, "hidden_act": "gelu"}
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1}
#: T5 v1.1 XXL (google/t5-v1_1-xxl), FLUX.1's text_encoder_2
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
#: the default image size of each family's recipes (a recipe's own teacher.resolution or data.resolution wins)
RESOLUTION = {"sd": 512, "sdxl": 1024, "sd3": 1024, "sd35": 1024, "flux": 1024}
#: flux_dmd's batch on one GPU: FastGen's 2 per GPU (the recipe's 16 is 2 x 8 GPUs)
ONE_GPU = ["train.batch_size=2", "train.launch_processes=1"]
#: (label, recipe, overrides): every SD recipe, DMD's 4-step generator (backward simulation), and one SD 1.5 and one
#: SDXL recipe with train.compile (regional torch.compile; the first step of each phase compiles and is not counted)
EXTRA = [("sd15_dmd@4steps", "sd15_dmd", ["loss.steps=4", "sample.steps=4"]),
         ("sd15_lcm@compile", "sd15_lcm", ["train.compile=true"]),
         ("sdxl_lcm_lora@compile", "sdxl_lcm_lora", ["train.compile=true"]),
         # one process under train.parallel fsdp: its own NCCL group for CUDA tensors (fewstep/sharding.py)
         ("sd15_lcm@fsdp", "sd15_lcm", ["train.parallel=fsdp"]),
         ("flux_dmd@lora", "flux_dmd", ["lora.rank=64", "lora.alpha=64", "loss.fake_init=teacher_lora",
                                        "train.parallel=ddp", *ONE_GPU]),
         # the LoRA student's frozen base in bfloat16 (--dry-run: 48.9 GiB against 71.1 before activations)
         ("flux_dmd@lora_bf16_base", "flux_dmd", ["lora.rank=64", "lora.alpha=64", "loss.fake_init=teacher_lora",
                                                  "train.parallel=ddp", "lora.base_dtype=bfloat16", *ONE_GPU]),
         # SD 3.5 Medium's full f-distill needs FSDP; one GPU holds a LoRA student and a LoRA fake score
         ("sd35_fdistill@lora", "sd35_fdistill", ["lora.rank=64", "lora.alpha=64", "loss.fake_init=teacher_lora",
                                                  "train.parallel=ddp", "train.batch_size=6",
                                                  "train.launch_processes=1"]),
         ("sdxl_lcm_lora@bf16_base", "sdxl_lcm_lora", ["lora.base_dtype=bfloat16"])]
#: recipes one GPU cannot hold (reported, not run)
TOO_BIG = {"flux_dmd": "12B student and fake score with AdamW: 378 GiB before activations; FSDP over 8 GPUs",
           "sd35_fdistill": "2.5B student and fake score with AdamW: 80 GB before the teacher; FSDP over 8 GPUs"}
#: the order rows run in: SD 1.5 and SDXL first, FLUX.1 last (a run cut short by its budget loses the largest)
FAMILY_ORDER = ("sd", "sdxl", "sd3", "sd35", "flux")


def real_pipeline(family: str, directory: Path) -> Path:
    """A ``family`` pipeline at its published size, random weights built on the GPU, saved in float16."""
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from fewstep.testing.tokenizer import write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory.parent / f".{family}-tok"), model_max_length=77)

    def clip(spec, cls):
        cfg = CLIPTextConfig(**spec, vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return cls(cfg)

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKL(**VAE, **VAE_BY_FAMILY[family])
        if family == "sd":
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip(CLIP_L, CLIPTextModel), tokenizer=tok,
                                           unet=UNet2DConditionModel(**SD15_UNET), scheduler=DDIMScheduler(**SD_SCHEDULER),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif family == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip(CLIP_L, CLIPTextModel),
                                             text_encoder_2=clip(CLIP_G, CLIPTextModelWithProjection), tokenizer=tok,
                                             tokenizer_2=tok, unet=UNet2DConditionModel(**SDXL_UNET),
                                             scheduler=DDIMScheduler(**{**SD_SCHEDULER, "timestep_spacing": "leading"}),
                                             force_zeros_for_empty_prompt=True)
        elif family == "flux":  # FluxTransformer2DModel's defaults are FLUX.1's (scripts/convert_flux_to_diffusers.py)
            from diffusers import FluxPipeline, FluxTransformer2DModel
            from transformers import T5Config, T5EncoderModel

            from fewstep.testing.tiny import FLUX_SCHEDULER
            from fewstep.testing.tokenizer import t5_tokenizer

            pipe = FluxPipeline(transformer=FluxTransformer2DModel(guidance_embeds=True),
                                scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                                text_encoder=clip(CLIP_L, CLIPTextModel), tokenizer=tok,
                                text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)), tokenizer_2=t5_tokenizer())
        else:
            config = SD35_TRANSFORMER if family == "sd35" else SD3_TRANSFORMER
            pipe = StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**config),
                                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                            text_encoder=clip(CLIP_L, CLIPTextModelWithProjection), tokenizer=tok,
                                            text_encoder_2=clip(CLIP_G, CLIPTextModelWithProjection), tokenizer_2=tok,
                                            text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.bfloat16 if family == "flux" else torch.float16).save_pretrained(directory)
    del pipe
    torch.cuda.empty_cache()
    return directory


def standins(root: Path, tiny: bool, fams: tuple[str, ...]) -> tuple[dict[str, Path], dict[int, Path], Path]:
    """(pipelines of ``fams``, captioned image folders per resolution, LPIPS file). FLUX.1 at full size is 33 GB in
    bfloat16 with its T5: only the families the chosen recipes need are built."""
    from fewstep.testing.tiny import TINY_RESOLUTION, save_captioned_digits, save_random_lpips, save_tiny_pipeline

    if tiny:
        pipes = {f: save_tiny_pipeline(f, root / f) for f in fams}
        folders = {TINY_RESOLUTION: save_captioned_digits(root / "images", resolution=TINY_RESOLUTION)}
    else:
        pipes = {f: real_pipeline(f, root / f) for f in fams}
        folders = {r: save_captioned_digits(root / f"images{r}", num=16, resolution=r) for r in (512, 1024)}
    return pipes, folders, save_random_lpips(root / "lpips_vgg.safetensors")


def recipe_resolution(name: str, family: str) -> int:
    """The image size a recipe runs at: its teacher.resolution, else its data.resolution, else the family's."""
    from fewstep.config import load_recipe

    raw = load_recipe(name).raw
    return int((raw.get("teacher") or {}).get("resolution") or (raw.get("data") or {}).get("resolution")
               or RESOLUTION[family])


def without_stage_models(sub, base_raw):
    """A stage's recipe with earlier stages' models replaced by the base recipe's (nothing is exported here)."""
    from fewstep.config import validate

    raw = copy.deepcopy(sub.raw)
    for key in ("teacher", "student"):
        if str((raw.get(key) or {}).get("path") or "").startswith("stage:"):
            raw[key] = copy.deepcopy(base_raw[key])
    (raw.get("loss") or {}).pop("fake_from", None)
    return validate(raw)


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def nonfinite(logs: dict) -> list[str]:
    """The logged values (floats or tensors) that are not finite."""
    out = []
    for k, v in logs.items():
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                out.append(k)
        elif isinstance(v, float) and not math.isfinite(v):
            out.append(k)
    return out


def time_training(sub, outputs, guard: float) -> dict:
    """Median step time per phase (first step of each phase excluded) within ``guard`` seconds."""
    from fewstep.data.plan import BatchSource
    from fewstep.run import build_loop

    start = time.perf_counter()
    loop = build_loop(sub, stage_outputs=outputs, log=lambda m: None)
    built = time.perf_counter() - start
    source = BatchSource(loop.dataset, loop.plan, rank=0, start_step=0, num_workers=0)
    times: dict[str, list[float]] = {}
    status = "ok"
    while any(len(v) < 2 for v in times.values()) or len(times) < len(loop.loss.phases):
        if time.perf_counter() - start > guard:
            status = f"guard {guard:.0f} s"
            break
        sync()
        t0 = time.perf_counter()
        logs = loop.train_step(source)
        sync()
        times.setdefault(logs["phase"], []).append(time.perf_counter() - t0)
        bad = nonfinite(logs)
        if bad:
            status = f"error: non-finite {', '.join(bad)} at step {sum(map(len, times.values()))} ({logs['phase']})"
            break
    del loop
    return {"build_s": built, "status": status,
            "phases": {p: (statistics.median(v[1:]) if len(v) > 1 else None, len(v)) for p, v in times.items()}}


def rehearse(label: str, name: str, extra: list[str], stand: tuple, root: Path, tiny: bool, guard: float,
             deadline: float) -> list[dict]:
    from fewstep.config import load_recipe
    from fewstep.run import run_pairs, stage_recipes
    from fewstep.testing.recipes import cpu_overrides, family_of, standin_overrides
    from fewstep.testing.tiny import TINY_RESOLUTION

    pipes, folders, lpips = stand
    fam = family_of(name)
    if name in TOO_BIG and label == name:
        return [{"recipe": label, "stage": "-", "kind": "distill", "status": f"not run: {TOO_BIG[name]}"}]
    res = TINY_RESOLUTION if tiny else recipe_resolution(name, fam)
    over = standin_overrides(name, pipelines=pipes, images=folders[res], resolution=res, lpips_weights=lpips)
    over += [f"train.output_dir={root / 'runs' / label}", "train.progress=false", "train.sample_every=0",
             "train.eval_every=0", *extra]
    if tiny:
        over += cpu_overrides(name)
    recipe = load_recipe(name, over)
    if recipe.pairs is not None:
        n = min(recipe.pairs.batch_size, 4)
        recipe = load_recipe(name, over + [f"pairs.num={n}", f"pairs.shard_size={n}", f"pairs.batch_size={n}"])
    stages = stage_recipes(recipe) if recipe.stages else [(label, "distill", recipe)]
    rows, outputs = [], {}
    for sname, kind, sub in stages:
        row = {"recipe": label, "stage": sname if recipe.stages else "-", "kind": kind}
        if time.perf_counter() > deadline:
            rows.append({**row, "status": "not run (budget)"})
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sub = without_stage_models(sub, recipe.raw)
        try:
            if kind == "pairs":
                t0 = time.perf_counter()
                run_pairs(sub, stage_outputs=outputs, progress=False, log=lambda m: None)
                row.update(status="ok", pairs_per_s=sub.pairs.num / (time.perf_counter() - t0),
                           batch=sub.pairs.batch_size, steps=sub.pairs.steps)
            else:
                row.update(time_training(sub, outputs, guard), batch=sub.train.batch_size)
        except Exception as e:  # a rehearsal reports every recipe, and what stopped one
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        row["peak_gib"] = peak_gib()
        outputs[sname] = Path(sub.train.output_dir)  # stage:NAME of a pairs stage reads its pairs/ there
        rows.append(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def precision_check(pipes: dict[str, Path], tiny: bool) -> list[dict]:
    """benchmarks/precision.py on the SD 1.5 stand-in's UNet: sd15_fdistill_js's GAN gradient through the frozen
    teacher in float16 and bfloat16 against float32, at the recipe's per-GPU batch and 512 px (tiny: batch 2)."""
    from diffusers import UNet2DConditionModel

    from precision import inputs, precision_rows

    device = "cpu" if tiny else "cuda"
    unet = UNet2DConditionModel.from_pretrained(pipes["sd"], subfolder="unet").float().to(device)
    batch, latent = (2, 8) if tiny else (8, 64)
    x, t, cond = inputs(unet, batch, latent, 500, 0, device)
    rows = precision_rows(unet, x, t, cond, 1e-3, "bfloat16", ["float16", "bfloat16"])
    del unet
    return [{**r, "batch": batch, "latent": latent} for r in rows]


def save_resume_export(pipes: dict[str, Path], folders: dict, root: Path, tiny: bool) -> dict:
    """sd15_lcm_lora: 2 steps with a checkpoint at each, then the same command with max_steps 3 resumes from step
    2 and exports; the export loads as fewstep sample does and draws a finite one-step image."""
    from fewstep.config import load_recipe
    from fewstep.generate import Generator
    from fewstep.run import run_recipe
    from fewstep.testing.recipes import standin_overrides
    from fewstep.testing.tiny import TINY_RESOLUTION

    name, res = "sd15_lcm_lora", TINY_RESOLUTION if tiny else 512
    over = standin_overrides(name, pipelines=pipes, images=folders[res], resolution=res, lpips_weights=None)
    over += [f"train.output_dir={root / 'runs' / 'save_resume_export'}", "train.progress=false", "train.sample_every=0",
             "train.checkpoint_every=1", "train.log_every=1", "train.batch_size=2"]
    if tiny:
        over += ["train.mixed_precision=no", "train.teacher_dtype=float32"]
    logs: list[str] = []
    t0 = time.perf_counter()
    first = run_recipe(load_recipe(name, over + ["train.max_steps=2"]), log=logs.append)
    t1 = time.perf_counter()
    second = run_recipe(load_recipe(name, over + ["train.max_steps=3"]), log=logs.append)
    t2 = time.perf_counter()
    resumed = any("resumed from" in m and "at step 2" in m for m in logs)
    image = Generator.load(str(second.final_dir))(1, steps=1, prompts=["a photo of a cat"])
    ok = (first.step, second.step, resumed, bool(torch.isfinite(image).all())) == (2, 3, True, True)
    return {"recipe": f"{name}@save_resume_export", "stage": "-", "kind": "distill", "batch": 2,
            "status": "ok" if ok else f"error: steps {first.step}, {second.step}, resumed {resumed}, finite image "
                                      f"{bool(torch.isfinite(image).all())}",
            "first_run_s": t1 - t0, "resume_and_export_s": t2 - t1, "peak_gib": peak_gib()}


def latency_rows(pipes: dict[str, Path], tiny: bool, repeats: int = 5) -> list[dict]:
    """One-step latency of SD 1.5 at 512 px and SDXL at 1024 px (float16 on a GPU; tiny and float32 on a CPU): the
    pipeline called plainly (`pipe(prompt, num_inference_steps=1, guidance_scale=0)`), then with its UNet compiled
    per block (fewstep.compiling.compile_regions: diffusers' _repeated_blocks); median of ``repeats`` after warm-up
    (the compiled warm-up includes the compile, reported apart)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from fewstep.compiling import compile_regions
    from fewstep.testing.tiny import TINY_RESOLUTION

    rows = []
    for fam, cls in (("sd", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
        res = TINY_RESOLUTION if tiny else RESOLUTION[fam]
        dtype = torch.float32 if tiny else torch.float16
        pipe = cls.from_pretrained(pipes[fam], torch_dtype=dtype).to("cpu" if tiny else "cuda")
        pipe.set_progress_bar_config(disable=True)

        def call() -> None:
            pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0, height=res, width=res, output_type="pt")

        for compiled in (False, True):
            t0 = time.perf_counter()
            if compiled:
                compile_regions(pipe.unet)
            call()  # warm-up (compiles on the compiled pass)
            sync()
            warm = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                sync()
                t1 = time.perf_counter()
                call()
                sync()
                times.append(time.perf_counter() - t1)
            rows.append({"family": fam, "resolution": res, "dtype": str(dtype).split(".")[-1], "compiled": compiled,
                         "median_s": statistics.median(times), "warmup_s": warm, "peak_gib": peak_gib()})
        pipe = None  # freed before the next family's
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def latency_table(rows: list[dict]) -> str:
    out = ["| pipeline | resolution | dtype | UNet compiled | one-step median ms | warm-up s | ratio to uncompiled |",
           "|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        base.setdefault(r["family"], r["median_s"])
        out.append(f"| {r['family']} | {r['resolution']} | {r['dtype']} | {r['compiled']} | {r['median_s'] * 1e3:.1f} | "
                   f"{r['warmup_s']:.1f} | {r['median_s'] / base[r['family']]:.2f} |")
    return "\n".join(out)


def precision_table(rows: list[dict]) -> str:
    if rows and "error" in rows[0]:
        return f"precision check: error: {rows[0]['error']}"
    out = ["| gradient path | teacher dtype (loop autocast bf16) | cosine vs float32 | exact zeros | exact zeros at "
           "mid-block | median abs gradient | batch, latent |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mid = f"{r['mid_zeros']:.3f}" if "mid_zeros" in r else ""
        out.append(f"| {r['path']} | {r['teacher_dtype']} | {r['cosine']:.4f} | {r['zeros']:.3f} | {mid} | "
                   f"{r['median_abs']:.3g} | {r['batch']}, {r['latent']} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| recipe | stage | batch | phase: median step s (steps run) | pairs/s | peak CUDA GiB | status |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        phases = ", ".join(f"{p} {'-' if m is None else f'{m:.3f}'} ({n})" for p, (m, n) in r.get("phases", {}).items())
        pairs = f"{r['pairs_per_s']:.2f} ({r['steps']} steps)" if "pairs_per_s" in r else ""
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        out.append(f"| {r['recipe']} | {r['stage']} | {r.get('batch', '')} | {phases} | {pairs} | {peak} | {r['status']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from fewstep.config import available_recipes
    from fewstep.io import write_json_atomic
    from fewstep.testing.recipes import FAMILY

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=280.0, help="seconds after which no further stage starts")
    ap.add_argument("--guard", type=float, default=30.0, help="seconds one training stage may run")
    ap.add_argument("--recipes", default=None, help="comma-separated labels (default: every SD recipe and sd15_dmd@4steps)")
    ap.add_argument("--tiny", action="store_true", help="the tiny pipelines even when CUDA is there")
    ap.add_argument("--out", default="gpu_rehearsal.json",
                    help="the report, rewritten (atomically) after every row, so a killed run keeps its finished rows")
    ap.add_argument("--no-latency", action="store_true", help="skip the one-step latency rows (compile off / on)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    tiny = args.tiny or not torch.cuda.is_available()
    jobs = [(n, n, []) for n in sorted(available_recipes()) if n.startswith(tuple(FAMILY))] + EXTRA
    if args.recipes:
        wanted = args.recipes.split(",")
        unknown = sorted(set(wanted) - {j[0] for j in jobs})
        if unknown:
            print(f"gpu_rehearsal: unknown recipe {unknown[0]!r}; valid: {', '.join(j[0] for j in jobs)}", file=sys.stderr)
            return 2
        jobs = [j for j in jobs if j[0] in wanted]
    from fewstep.testing.recipes import family_of

    jobs.sort(key=lambda j: FAMILY_ORDER.index(family_of(j[1])))  # stable: a family's recipes keep their order
    out = Path(args.out)
    report: dict = {"device": None, "finished": False, "rows": [], "precision": [], "latency": []}

    def write() -> None:  # after every row: a killed run leaves the rows it finished
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_json_atomic(report, out)

    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if (not tiny and shm.is_dir()) else None) as tmp:
        root = Path(tmp)
        fams = tuple(dict.fromkeys(("sd", *(family_of(name) for _, name, _ in jobs))))  # sd: precision, save/resume
        if not args.no_latency:  # the latency rows time SD 1.5 and SDXL
            fams = tuple(dict.fromkeys((*fams, "sdxl")))
        stand = standins(root, tiny, fams)
        report["device"] = torch.cuda.get_device_name() if not tiny else "CPU, tiny pipelines"
        print(f"gpu_rehearsal on {report['device']}: stand-ins ready after {time.perf_counter() - start:.0f} s", flush=True)
        write()
        rows = report["rows"]
        try:
            report["precision"] = precision_check(stand[0], tiny)
        except Exception as e:  # reported, as the training rows are
            report["precision"] = [{"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}]
        print(precision_table(report["precision"]), flush=True)
        write()
        try:
            rows.append(save_resume_export(stand[0], stand[1], root, tiny))
        except Exception as e:
            rows.append({"recipe": "sd15_lcm_lora@save_resume_export", "stage": "-", "kind": "distill",
                         "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        write()
        for label, name, extra in jobs:
            new = rehearse(label, name, extra, stand, root, tiny, args.guard, start + args.budget)
            rows += new
            for line in table(new).splitlines()[2:]:
                print(line, flush=True)
            write()
        if not args.no_latency and time.perf_counter() < start + args.budget:
            try:
                report["latency"] = latency_rows(stand[0], tiny)
            except Exception as e:  # reported, as the training rows are
                report["latency"] = [{"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}]
    latency = report["latency"]
    print(f"\n{table(rows)}\n")
    print(f"{precision_table(report['precision'])}\n")
    if latency and "error" in latency[0]:
        print(f"one-step latency: error: {latency[0]['error']}\n")
    elif latency:
        print(f"{latency_table(latency)}\n")
    print(f"total {time.perf_counter() - start:.0f} s")
    report["finished"] = True
    write()
    failed = (any(r["status"].startswith("error") for r in rows) or bool(latency and "error" in latency[0])
              or any("error" in r for r in report["precision"]))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
