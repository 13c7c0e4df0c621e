"""GPU rehearsal: every SD recipe (sd15_*, sdxl_*, sd3_*, flux_*; DMD at 1 and 4 generator steps) trains a few steps
at the published architecture sizes, and each stage reports its step time per phase and its peak CUDA memory.

    python benchmarks/gpu_rehearsal.py [--budget 280] [--guard 30] [--recipes sd15_dmd,...] [--out report.json]

With CUDA: pipelines with random weights are built on the GPU from the configs below (SD 1.5, SDXL base, SD3
medium without its T5 encoder: no tokenizer files offline, and diffusers runs SD3 with zeros in its place; FLUX.1
[dev] at 11.9B with T5-XXL, its tokenizer fewstep's small Unigram one), saved in float16 (FLUX.1: bfloat16, as it
ships) under /dev/shm, and every recipe runs against them with its own batch, dtypes and resolution. flux_dmd itself (12B student and fake score:
378 GiB before activations) needs FSDP over 8 GPUs; one GPU rehearses flux_dmd@lora, LoRA student and fake score
(72 GiB before activations), the variant --dry-run says fits, and the same with the LoRA student's frozen base in
bfloat16 (lora.base_dtype: 49 GiB); sdxl_lcm_lora@bf16_base times and sizes SDXL's LCM-LoRA that way. Without
CUDA (or with --tiny): the same code on the test suite's tiny pipelines at batch 2, to check the script.

Each stage: pairs stages make one batch of pairs with the recipe's solver and steps (pairs/s); training stages
build the recipe's loop and time ``train_step`` until every phase has run twice (its first step, which warms up
kernels and allocators, is not counted) or the stage's guard runs out. Nothing is checkpointed or exported: a stage
whose student is an earlier stage's model starts from the teacher instead (same architecture). The whole run
stops starting stages when --budget seconds are spent, and says which it left out.

Then (unless --no-latency) one-step latency: SD 1.5 at 512 px and SDXL at 1024 px in float16, the pipeline called
plainly, with its UNet uncompiled and then compiled per block (train.compile's regional compilation); the
compile's warm-up time is reported apart. sd15_lcm@compile and sdxl_lcm_lora@compile time the training step with
train.compile beside the same recipes uncompiled.
"""
from __future__ import annotations

import argparse
import copy
import gc
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
VAE = {"in_channels": 3, "out_channels": 3, "layers_per_block": 2, "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
VAE_BY_FAMILY = {"sd": {"latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
                 "sdxl": {"latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025},
                 "sd3": {"latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
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
RESOLUTION = {"sd": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
#: (label, recipe, overrides): every SD recipe, DMD's 4-step generator (backward simulation), and one SD 1.5 and one
#: SDXL recipe with train.compile (regional torch.compile; the first step of each phase compiles and is not counted)
EXTRA = [("sd15_dmd@4steps", "sd15_dmd", ["loss.steps=4", "sample.steps=4"]),
         ("sd15_lcm@compile", "sd15_lcm", ["train.compile=true"]),
         ("sdxl_lcm_lora@compile", "sdxl_lcm_lora", ["train.compile=true"]),
         ("flux_dmd@lora", "flux_dmd", ["lora.rank=64", "lora.alpha=64", "loss.fake_init=teacher_lora",
                                        "train.parallel=ddp"]),
         # the LoRA student's frozen base in bfloat16 (--dry-run: 48.9 GiB against 71.1 before activations)
         ("flux_dmd@lora_bf16_base", "flux_dmd", ["lora.rank=64", "lora.alpha=64", "loss.fake_init=teacher_lora",
                                                  "train.parallel=ddp", "lora.base_dtype=bfloat16"]),
         ("sdxl_lcm_lora@bf16_base", "sdxl_lcm_lora", ["lora.base_dtype=bfloat16"])]
#: recipes one GPU cannot hold (reported, not run)
TOO_BIG = {"flux_dmd": "12B student and fake score with AdamW: 378 GiB before activations; FSDP over 8 GPUs"}


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
            pipe = StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**SD3_TRANSFORMER),
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
    del loop
    return {"build_s": built, "status": status,
            "phases": {p: (statistics.median(v[1:]) if len(v) > 1 else None, len(v)) for p, v in times.items()}}


def rehearse(label: str, name: str, extra: list[str], stand: tuple, root: Path, tiny: bool, guard: float,
             deadline: float) -> list[dict]:
    from fewstep.config import load_recipe
    from fewstep.run import run_pairs, stage_recipes
    from fewstep.testing.recipes import family_of, standin_overrides
    from fewstep.testing.tiny import TINY_RESOLUTION

    pipes, folders, lpips = stand
    fam = family_of(name)
    if name in TOO_BIG and label == name:
        return [{"recipe": label, "stage": "-", "kind": "distill", "status": f"not run: {TOO_BIG[name]}"}]
    res = TINY_RESOLUTION if tiny else recipe_resolution(name, fam)
    over = standin_overrides(name, pipelines=pipes, images=folders[res], resolution=res, lpips_weights=lpips)
    over += [f"train.output_dir={root / 'runs' / label}", "train.progress=false", "train.sample_every=0",
             "train.eval_every=0", *extra]
    if tiny:  # float32 on CPU: its float16 and bfloat16 kernels are slow and say nothing about a GPU's
        over += ["train.batch_size=2", "pairs.batch_size=2", "train.mixed_precision='no'", "train.teacher_dtype=float32"]
        over += [f"stages.{st['name']}.train.batch_size=2" for st in load_recipe(name).stages
                 if "batch_size" in (st.get("train") or {})]
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


def table(rows: list[dict]) -> str:
    out = ["| recipe | stage | batch | phase: median step s (steps run) | pairs/s | peak CUDA GiB | status |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        phases = ", ".join(f"{p} {'-' if m is None else f'{m:.3f}'} ({n})" for p, (m, n) in r.get("phases", {}).items())
        pairs = f"{r['pairs_per_s']:.2f} ({r['steps']} steps)" if "pairs_per_s" in r else ""
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        out.append(f"| {r['recipe']} | {r['stage']} | {r.get('batch', '')} | {phases} | {pairs} | {peak} | {r['status']} |")
    return "\n".join(out)


def main() -> int:
    from fewstep.config import available_recipes
    from fewstep.io import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=280.0, help="seconds after which no further stage starts")
    ap.add_argument("--guard", type=float, default=30.0, help="seconds one training stage may run")
    ap.add_argument("--recipes", default=None, help="comma-separated labels (default: every SD recipe and sd15_dmd@4steps)")
    ap.add_argument("--tiny", action="store_true", help="the tiny pipelines even when CUDA is there")
    ap.add_argument("--out", default=None, help="write the rows as JSON here too")
    ap.add_argument("--no-latency", action="store_true", help="skip the one-step latency rows (compile off / on)")
    args = ap.parse_args()
    start = time.perf_counter()
    tiny = args.tiny or not torch.cuda.is_available()
    jobs = [(n, n, []) for n in sorted(available_recipes()) if n.startswith(("sd15_", "sdxl_", "sd3_", "flux_"))] + EXTRA
    if args.recipes:
        wanted = args.recipes.split(",")
        unknown = sorted(set(wanted) - {j[0] for j in jobs})
        if unknown:
            print(f"gpu_rehearsal: unknown recipe {unknown[0]!r}; valid: {', '.join(j[0] for j in jobs)}", file=sys.stderr)
            return 2
        jobs = [j for j in jobs if j[0] in wanted]
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if (not tiny and shm.is_dir()) else None) as tmp:
        root = Path(tmp)
        from fewstep.testing.recipes import family_of

        fams = tuple(dict.fromkeys(family_of(name) for _, name, _ in jobs))
        if not args.no_latency:  # the latency rows time SD 1.5 and SDXL
            fams = tuple(dict.fromkeys((*fams, "sd", "sdxl")))
        stand = standins(root, tiny, fams)
        device = torch.cuda.get_device_name() if not tiny else "CPU, tiny pipelines"
        print(f"gpu_rehearsal on {device}: stand-ins ready after {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for label, name, extra in jobs:
            rows += rehearse(label, name, extra, stand, root, tiny, args.guard, start + args.budget)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        latency = []
        if not args.no_latency and time.perf_counter() < start + args.budget:
            try:
                latency = latency_rows(stand[0], tiny)
            except Exception as e:  # reported, as the training rows are
                latency = [{"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}]
    print(f"\n{table(rows)}\n")
    if latency and "error" in latency[0]:
        print(f"one-step latency: error: {latency[0]['error']}\n")
    elif latency:
        print(f"{latency_table(latency)}\n")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        write_json_atomic({"device": device, "rows": rows, "latency": latency}, Path(args.out))
    failed = any(r["status"].startswith("error") for r in rows) or bool(latency and "error" in latency[0])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
