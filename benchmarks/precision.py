"""Precision check: the gradient a trained term sends through a frozen network, in the dtypes a recipe sets,
against the same computation in float32.

    python benchmarks/precision.py [--recipe sd15_fdistill_js] [--batch 8] [--latent 64] [--out precision.json]
    python benchmarks/precision.py --tiny          # the tiny SD fixture: the same code in seconds (the test suite's)

The paths: (gan) f-distill's generator GAN term, gan_weight * softplus(-D(x_t)), where D is fewstep's
FeatureDiscriminator (a fresh head on the frozen teacher's mid-block features, fewstep/discriminators.py), back
through the teacher to the generator's sample x; (teacher_lora) the fake score's denoising loss on float32 LoRA
adapters (rank 64) on the frozen teacher (``fake_init: teacher_lora``, sd15_fdistill_lora), to the adapters. For
each teacher dtype the gradient is compared with float32's (the teacher in float32, no autocast): its cosine
(>= 0.99 passes), its fraction of exact zeros (float32's is 0; for the adapters, over the entries float32 gives a
nonzero gradient: LoRA's B starts at zero, so A's gradient is zero at step 0), the median absolute gradient, and
for gan the zeros of dL/dmid (the gradient reaching the mid-block's output). The teacher runs as the loop runs it: in
train.teacher_dtype, outside the run's autocast (fewstep/denoisers/base.py); the head in float32.

The network is SD 1.5's UNet at its published config (benchmarks/gpu_rehearsal.py SD15_UNET) with random weights
(diffusers' initialisation; no trained weights are reachable here), at the recipe's resolution and per-GPU batch.
Random weights are not trained ones: a trained UNet's activations and the head's gradient have other scales, so
a pass here bounds nothing for a real checkpoint; `--teacher PATH` runs the same check on a real diffusers
pipeline's UNet (the GPU rehearsal does, with CUDA).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: a pass: the gradient's cosine against float32
MIN_COSINE = 0.99


def sd15_unet(seed: int, tiny: bool, teacher: str | None = None):
    """SD 1.5's UNet: a real one from ``teacher`` (a diffusers pipeline directory), else the published config with
    diffusers' random initialisation (seeded), or the tiny test fixture's config."""
    from diffusers import UNet2DConditionModel

    if teacher is not None:
        return UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").float()
    if tiny:  # fewstep.testing.tiny.tiny_sd's UNet
        from fewstep.testing.tiny import SAMPLE_SIZE, TEXT_DIM

        config = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=SAMPLE_SIZE, in_channels=4,
                      out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
                      attention_head_dim=8)
    else:
        from gpu_rehearsal import SD15_UNET

        config = dict(SD15_UNET)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).float()


def frozen_setup(unet, dtype: torch.dtype, x: torch.Tensor, autocast: str | None):
    """(a frozen copy of ``unet`` in ``dtype`` on x's device, SD's schedule, the seeded noise of x_t, the run's
    autocast context): what both gradient paths run under."""
    import copy

    from fewstep.schedules import VPSchedule

    net = copy.deepcopy(unet).to(x.device, dtype).requires_grad_(False)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.device)
    kind = x.device.type
    ctx = torch.autocast(kind, dtype=DTYPES[autocast]) if autocast else torch.autocast(kind, enabled=False)
    return net, VPSchedule.from_betas(), eps, ctx


def gan_gradient(unet, dtype: torch.dtype, x: torch.Tensor, t: torch.Tensor, cond: dict, gan_weight: float,
                 autocast: str | None, head_state: dict | None = None):
    """(dL/dx, dL/dmid, the head's state) for L = gan_weight * softplus(-D(x_t)) with the teacher in ``dtype``."""
    from fewstep.denoisers.unet import UNetDenoiser
    from fewstep.discriminators import FeatureDiscriminator
    from fewstep.losses.gan import generator_loss

    net, schedule, eps, ctx = frozen_setup(unet, dtype, x, autocast)
    teacher = UNetDenoiser(net, schedule, "epsilon")
    torch.manual_seed(1)
    disc = FeatureDiscriminator(teacher).to(x.device)
    if head_state is not None:
        disc.load_state_dict(head_state)
    mid = {}

    def keep(module, inputs, output) -> None:  # returns None: the output is kept, not replaced
        output.retain_grad()
        mid["out"] = output

    net.mid_block.register_forward_hook(keep)
    x = x.clone().requires_grad_(True)
    with ctx:
        x_t = schedule.add_noise(x, eps, t)
        loss = gan_weight * generator_loss(disc(x_t, t, cond), "non_saturating")
    loss.backward()
    return x.grad.detach().float(), mid["out"].grad.detach().float(), disc.state_dict()


def lora_fake_gradient(unet, dtype: torch.dtype, x: torch.Tensor, t: torch.Tensor, cond: dict, autocast: str | None,
                       rank: int = 64) -> torch.Tensor:
    """The fake score's denoising-loss gradient on its LoRA adapters (``fake_init: teacher_lora``: float32 adapters
    on the frozen teacher in ``dtype``, fewstep/losses/fdivergence.py), all adapter gradients in one vector."""
    import torch.nn.functional as F

    from fewstep.denoisers.unet import UNetDenoiser
    from fewstep.losses.fdivergence import FAKE_LORA_TARGETS
    from fewstep.lora import default_targets, inject_lora

    net, schedule, eps, ctx = frozen_setup(unet, dtype, x, autocast)
    inject_lora(net, rank=rank, alpha=None, target_modules=default_targets(net, FAKE_LORA_TARGETS),
                adapter_name="fake_score")
    adapters = [p for n, p in net.named_parameters() if "lora_" in n]
    for p in adapters:
        p.data = p.data.float()
    fake = UNetDenoiser(net, schedule, "epsilon")
    with ctx:
        x_t = schedule.add_noise(x, eps, t)
        loss = F.mse_loss(fake.native(x_t, t, cond).float(), fake.native_target(x, eps, t).float())
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in adapters])


def precision_rows(unet, x: torch.Tensor, t: torch.Tensor, cond: dict, gan_weight: float, autocast: str | None,
                   dtypes: list[str], paths: tuple[str, ...] = ("gan", "teacher_lora")) -> list[dict]:
    """Per path, float32's row (no autocast), then one per teacher dtype under the run's ``autocast``, compared with
    it: the GAN term's dL/dx through the teacher's features, and the teacher_lora fake score's adapter gradient."""
    rows = precision_gan(unet, x, t, cond, gan_weight, autocast, dtypes) if "gan" in paths else []
    if "teacher_lora" in paths:
        rows += precision_teacher_lora(unet, x, t, cond, autocast, dtypes)
    for row in rows:
        if row["teacher_dtype"] != "float32":
            row["passes"] = row["cosine"] >= MIN_COSINE and math.isfinite(row["cosine"])
    return rows


def precision_gan(unet, x, t, cond, gan_weight: float, autocast: str | None, dtypes: list[str]) -> list[dict]:
    start = time.perf_counter()
    ref_x, ref_mid, head = gan_gradient(unet, torch.float32, x, t, cond, gan_weight, None)
    rows = [{"path": "gan", "teacher_dtype": "float32", "autocast": None, "seconds": round(time.perf_counter() - start, 1),
             **compare(ref_x, ref_x), "mid_median_abs": ref_mid.abs().median().item(), "mid_zeros": 0.0}]
    for name in dtypes:
        start = time.perf_counter()
        gx, gmid, _ = gan_gradient(unet, DTYPES[name], x, t, cond, gan_weight, autocast, head)
        rows.append({"path": "gan", "teacher_dtype": name, "autocast": autocast,
                     "seconds": round(time.perf_counter() - start, 1), **compare(gx, ref_x),
                     "mid_median_abs": gmid.abs().median().item(), "mid_zeros": (gmid == 0).float().mean().item()})
    return rows


def precision_teacher_lora(unet, x, t, cond, autocast: str | None, dtypes: list[str]) -> list[dict]:
    start = time.perf_counter()
    ref = lora_fake_gradient(unet, torch.float32, x, t, cond, None)
    nonzero = ref != 0  # LoRA's B starts at zero, so A's gradient is exactly zero in every dtype at step 0: left out
    rows = [{"path": "teacher_lora", "teacher_dtype": "float32", "autocast": None,
             "seconds": round(time.perf_counter() - start, 1), **compare(ref[nonzero], ref[nonzero])}]
    for name in dtypes:
        start = time.perf_counter()
        g = lora_fake_gradient(unet, DTYPES[name], x, t, cond, autocast)
        rows.append({"path": "teacher_lora", "teacher_dtype": name, "autocast": autocast,
                     "seconds": round(time.perf_counter() - start, 1), **compare(g[nonzero], ref[nonzero])})
    return rows


def inputs(unet, batch: int, latent: int, t: int, seed: int, device: str = "cpu") -> tuple:
    """(x, t, cond): a seeded generator sample, its timestep and random text embeddings, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, latent, latent, generator=g)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device)}
    return x.to(device), torch.full((batch,), float(t), dtype=torch.float64, device=device), cond


def compare(g: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    a, b = g.flatten().double(), ref.flatten().double()  # float64: millions of entries sum without float32's error
    norms = (a.norm() * b.norm()).item()
    cos = (a @ b).item() / norms if norms > 0 else 0.0  # an all-zero gradient points nowhere: 0
    return {"cosine": cos, "zeros": (g == 0).float().mean().item(), "median_abs": g.abs().median().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="sd15_fdistill_js", help="whose gan_weight, teacher_dtype and precision to check")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's per-GPU batch")
    p.add_argument("--latent", type=int, default=None, help="latent size; default: the recipe's resolution / 8")
    p.add_argument("--dtypes", default="float16,bfloat16", help="teacher dtypes to compare with float32")
    p.add_argument("--paths", default="gan,teacher_lora", help="which gradient paths (gan, teacher_lora)")
    p.add_argument("--tiny", action="store_true", help="the tiny SD fixture's UNet (seconds)")
    p.add_argument("--teacher", default=None, help="a diffusers SD 1.5 pipeline directory: its trained UNet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t", type=int, default=500, help="the timestep of x_t (0..999)")
    p.add_argument("--out", default=None, help="write the rows as JSON (atomically)")
    args = p.parse_args(argv)
    from fewstep.config import load_recipe
    from fewstep.run import stage_recipes

    recipe = load_recipe(args.recipe)
    tr = recipe.train
    stages = [sub for _, kind, sub in stage_recipes(recipe) if kind != "pairs"]
    gan = max([recipe] + stages, key=lambda r: float(r.loss.get("gan_weight", 0.0) or 0.0))
    gan_weight = float(gan.loss.get("gan_weight", 0.0) or 0.0) or 1e-3
    batch = args.batch or max(1, gan.train.batch_size // gan.train.launch_processes)
    resolution = int(recipe.data.get("resolution") or recipe.teacher.resolution or 512)
    latent = args.latent or (8 if args.tiny else resolution // 8)
    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(tr.mixed_precision)
    torch.set_grad_enabled(True)
    unet = sd15_unet(args.seed, args.tiny, args.teacher)
    x, t, cond = inputs(unet, batch, latent, args.t, args.seed)
    print(f"precision check: {args.recipe} GAN term (gan_weight {gan_weight:g}) through the frozen teacher, "
          f"{'tiny' if args.tiny else 'SD 1.5-sized'} UNet ({sum(q.numel() for q in unet.parameters()) / 1e6:.0f}M), "
          f"batch {batch}, latent {latent}x{latent}, t {args.t}, loop autocast {autocast or 'none'}; recipe teacher_dtype "
          f"{tr.teacher_dtype}", flush=True)
    rows = precision_rows(unet, x, t, cond, gan_weight, autocast, args.dtypes.split(","), tuple(args.paths.split(",")))
    print(f"{'path':<14}{'teacher dtype':<14}{'cosine vs fp32':>15}{'zeros':>8}{'median |grad|':>15}"
          f"{'zeros at mid':>14}{'s':>7}")
    for r in rows:
        mid = f"{r['mid_zeros']:>14.3f}" if "mid_zeros" in r else " " * 14
        print(f"{r['path']:<14}{r['teacher_dtype']:<14}{r['cosine']:>15.4f}{r['zeros']:>8.3f}{r['median_abs']:>15.3g}"
              f"{mid}{r['seconds']:>7}{'' if 'passes' not in r else ('  pass' if r['passes'] else '  FAIL')}")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"recipe": args.recipe, "batch": batch, "latent": latent, "t": args.t,
                                   "gan_weight": gan_weight, "tiny": args.tiny, "rows": rows}, indent=1))
        tmp.replace(out)
    # the recipe's teacher dtype on the paths it trains through (its GAN head; its LoRA fake score if it has one)
    paths = {"gan"} | ({"teacher_lora"} if gan.loss.get("fake_init") == "teacher_lora" else set())
    mine = [r for r in rows if r["teacher_dtype"] == tr.teacher_dtype and r["path"] in paths and "passes" in r]
    mine = mine or [{"passes": True}]  # the recipe's own dtype not among those compared: nothing to judge
    return 0 if all(r["passes"] for r in mine) else 1


if __name__ == "__main__":
    sys.exit(main())
