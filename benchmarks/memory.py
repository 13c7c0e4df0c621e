"""Training memory per loss: full vs LoRA, with and without gradient checkpointing and bf16.

Measured: each configuration trains a few steps in its own subprocess on an SD-shaped pipeline built
from configs (the test suite's tiny SD with wider UNet blocks, --channels), and reports its peak
resident memory above the process's resident memory after imports (ru_maxrss; the same baseline in
every subprocess; glibc's mmap threshold fixed at 64 KiB, see CHILD_ENV), next to fewstep's own estimate (`fewstep distill --dry-run`: weights, gradients,
AdamW state; no activations). Losses: diffusion (denoising fine-tuning on images), reflow (on teacher
pairs made once beforehand, flow student), consistency distillation, f-distill (reverse KL = DMD).
Variants: float32; train.gradient_checkpointing; train.mixed_precision bf16 with a bfloat16 teacher;
both. Ratios are to the loss's full float32 row, run in the same invocation.

Estimated: the full/LoRA configurations with SD 1.5's UNet (built on the meta device: no memory, exact
parameter counts), teacher in float16, trained networks and their AdamW state in float32.

    python benchmarks/memory.py [--channels 128,256] [--latent 32] [--steps 2] [--batch 4] [--losses diffusion,reflow,consistency,fdistill]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LORA = {"rank": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                       "ff.net.2", "conv1", "conv2", "time_emb_proj"]}
LOSSES = ("diffusion", "reflow", "consistency", "fdistill")
#: glibc's malloc keeps freed blocks below a threshold that grows to 32 MiB, so peak RSS depends on the
#: order of allocations (a LoRA run measured 746 MiB against 583 for full training, with equal saved
#: activations); a fixed 64 KiB threshold hands large blocks back on free, and the peak follows live memory
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
VARIANTS = {"float32": (False, "no"), "grad ckpt": (True, "no"), "bf16": (False, "bf16"), "bf16 + grad ckpt": (True, "bf16")}
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


def recipe(base: str, images: str, pairs: str, out: str, loss: str, lora: bool, ckpt: bool, precision: str,
           batch: int, steps: int, resolution: int) -> dict:
    raw = {"name": "memory", "teacher": {"kind": "pipeline", "path": base}, "student": {"kind": "pipeline", "init": "teacher"},
           "optimizer": {"name": "AdamW", "lr": 1e-5},
           "train": {"output_dir": out, "max_steps": steps, "batch_size": batch, "progress": False, "sample_every": 0,
                     "checkpoint_every": 10**9, "log_every": 10**9, "gradient_checkpointing": ckpt,
                     "mixed_precision": precision, "teacher_dtype": "bfloat16" if precision == "bf16" else "float32"}}
    if lora:
        raw["lora"] = dict(LORA)
    images_data = {"name": "images", "root": images, "resolution": resolution}
    if loss == "fdistill":  # full: a full fake-score copy; LoRA: the fake score as LoRA on the teacher
        raw.update(loss={"name": "fdistill", "divergence": "reverse_kl", "fake_updates": 1,
                         "fake_init": "teacher_lora" if lora else "teacher", "fake_lora_rank": LORA["rank"]},
                   data={"name": "prompts"}, sample={"solver": "renoise", "steps": 1})
    elif loss == "consistency":  # full: an EMA target copy; LoRA: the online student is the target
        raw.update(loss={"name": "consistency", "target": "online" if lora else "ema", "num_timesteps": 10},
                   data=images_data, sample={"solver": "consistency", "spacing": "lcm", "steps": 1})
    elif loss == "reflow":
        raw["student"]["schedule"] = "flow"
        raw.update(loss={"name": "reflow"}, data={"name": "pairs", "path": pairs}, sample={"solver": "euler", "steps": 1})
    else:
        raw.update(loss={"name": "diffusion"}, data=images_data, sample={"solver": "ddim", "steps": 2})
    return raw


def make_pairs(base: str, out: Path, num: int) -> Path:
    """Teacher pairs for the reflow rows (made once, not measured)."""
    from fewstep.config import validate
    from fewstep.run import run_pairs

    raw = {"name": "memory-pairs", "teacher": {"kind": "pipeline", "path": base}, "student": {"kind": "pipeline", "init": "teacher"},
           "data": {"name": "prompts"},
           "pairs": {"num": num, "shard_size": num, "batch_size": num, "steps": 2, "solver": "ddim"},
           "train": {"output_dir": str(out)}}
    return run_pairs(validate(raw), progress=False, log=lambda m: None)


def child(spec: str) -> None:
    """Run one configuration; print JSON with the measured peak and fewstep's estimate (MiB)."""
    import resource

    import torch

    from fewstep.config import validate
    from fewstep.memory import estimate
    from fewstep.run import build_loop

    torch.set_num_threads(1)
    raw = json.loads(spec)
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20  # noqa: E731
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401  (imports out of the peak)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    base = rss()
    loop = build_loop(validate(raw), log=lambda m: None)
    loop.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    est = estimate([loop.teacher.net, *loop.networks.bare.values()])  # the networks that ran (teacher frozen by the loop)
    print(json.dumps({"peak": peak - base, "estimate": est.bytes / 2**20, "trainable": est.trainable}))


SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 2048,
             "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}


def unet_estimates(config: dict, rank: int, processes: int = 8) -> list[tuple[str, int, float, float, float]]:
    """Weights + gradients + AdamW state of the full/LoRA configurations for a UNet built on the meta device: the
    whole (ddp) per-process bytes, and under fsdp on ``processes`` processes with the teacher replicated / sharded
    (fewstep.memory.per_process_bytes, as `--dry-run` prints; the largest unit counted float32)."""
    import torch
    from diffusers import UNet2DConditionModel

    from fewstep.memory import OPTIMIZER_STATES, largest_unit_bytes, lora_parameter_count, per_process_bytes

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    n = sum(p.numel() for p in unet.parameters())
    r = lora_parameter_count(unet, rank, LORA["target_modules"])
    unit = largest_unit_bytes([unet])  # meta parameters report float32 sizes
    train = 4 * (1 + OPTIMIZER_STATES["AdamW"])  # float32 gradient + 2 AdamW states per trained parameter
    teacher, full32 = 2 * n, 4 * n  # float16 teacher; a float32 trained copy
    rows = [  # (name, trainable, bytes, teacher bytes kept whole under fsdp's "replicate")
        ("fdistill: full student, full fake-score copy", 2 * n, teacher + 2 * (full32 + n * train), teacher),
        ("fdistill: LoRA student, full fake-score copy", n + r, teacher + full32 + r * (4 + train) + full32 + n * train,
         teacher),
        ("fdistill: LoRA student, LoRA fake score on the teacher", 2 * r, teacher + full32 + 2 * r * (4 + train), 0),
        ("consistency: full student, EMA target", n, teacher + full32 + n * train + full32, teacher),
        ("consistency: LoRA student, online target", r, teacher + full32 + r * (4 + train), teacher),
    ]
    gib = 2**30
    return [(name, t, b / gib, per_process_bytes(b, whole, unit, processes=processes, parallel="fsdp") / gib,
             per_process_bytes(b, 0.0, unit, processes=processes, parallel="fsdp") / gib) for name, t, b, whole in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", default="128,256", help="the SD-shaped UNet's two block widths (tests use 32,64)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (images are twice as wide: the tiny VAE's factor)")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    from fewstep.errors import lookup
    from fewstep.testing.tiny import save_captioned_digits, save_tiny_pipeline

    losses = args.losses.split(",")
    for n in losses:
        lookup(dict.fromkeys(LOSSES), n, "loss")  # an unknown name: one line listing the valid ones
    root = Path(tempfile.mkdtemp())
    channels = tuple(int(c) for c in args.channels.split(","))
    base = save_tiny_pipeline("sd", root / "sd", channels=channels, sample_size=args.latent)
    images = save_captioned_digits(root / "images", num=8, resolution=2 * args.latent)
    pairs = make_pairs(str(base), root / "pairs_run", num=max(8, args.batch)) if "reflow" in losses else root
    print(f"measured: SD-shaped pipeline, UNet blocks {channels}, {args.latent}x{args.latent} latents, batch {args.batch}, "
          f"{args.steps} steps, CPU, LoRA rank "
          f"{LORA['rank']}; MiB above the process after imports")
    print("| loss | student | variant | trainable | estimate MiB | measured peak MiB | peak ratio |\n|---|---|---|---|---|---|---|")
    i = 0
    for loss in losses:
        first = None
        for lora in (False, True):
            for variant, (ckpt, precision) in VARIANTS.items():
                spec = recipe(str(base), str(images), str(pairs), str(root / f"run{i}"), loss, lora, ckpt, precision,
                              args.batch, args.steps, 2 * args.latent)
                i += 1
                res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                                     env=CHILD_ENV)
                if res.returncode != 0:
                    raise SystemExit(f"{loss} {variant} failed:\n{res.stderr[-2000:]}")
                m = json.loads(res.stdout.strip().splitlines()[-1])
                first = first or m["peak"]
                print(f"| {loss} | {'LoRA' if lora else 'full'} | {variant} | {m['trainable']:,} | {m['estimate']:.0f} | "
                      f"{m['peak']:.0f} | {m['peak'] / first:.2f} |", flush=True)
    for label, config, rank in (("SD 1.5", SD15_UNET, LORA["rank"]), ("SDXL", SDXL_UNET, 64)):
        print(f"\nestimated: {label} UNet, teacher float16, trained weights and AdamW state float32, LoRA rank {rank}; "
              "activations, text encoders and VAE excluded")
        print("| configuration | trainable | ddp GiB per process | fsdp x 8, teacher replicated | fsdp x 8, teacher sharded |"
              "\n|---|---|---|---|---|")
        for name, trainable, gib, rep, shd in unet_estimates(config, rank):
            print(f"| {name} | {trainable:,} | {gib:.1f} | {rep:.1f} | {shd:.1f} |")


if __name__ == "__main__":
    main()
