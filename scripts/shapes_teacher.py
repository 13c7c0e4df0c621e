"""Build the shapes text-to-image teacher (fewstep/assets/shapes_teacher): a StableDiffusionPipeline whose parts are
trained here, on the procedural shapes data (fewstep.data.shapes), in SD's order:

1. ``text``: a CLIP text encoder and its tokenizer (one token a word), trained contrastively against a small image
   tower (CLIP, Radford et al. 2021: symmetric InfoNCE, learned temperature), then frozen;
2. ``vae``: an AutoencoderKL with 4 latent channels (64 x 64 RGB -> 4 x 16 x 16), trained on reconstruction with
   a small KL term (SD's VAE: Rombach et al. 2022, without the GAN), then frozen; its ``scaling_factor`` is 1 / the
   standard deviation of its latents on the data, as SD's 0.18215 was chosen;
3. ``base``: the pipeline with a randomly initialised cross-attention UNet2DConditionModel and SD 1.5's schedule
   (scaled_linear 0.00085..0.012, 1000 steps, epsilon prediction);
4. ``unet``: the UNet trained with fewstep's own ``diffusion`` loss (recipes/shapes_teacher.yaml; its
   cond_drop_prob trains the empty-prompt branch for classifier-free guidance);
5. ``asset``: the trained pipeline copied into fewstep/assets/shapes_teacher with its model card.

Every stage checkpoints and resumes (``--work``, default runs/shapes_teacher): run ``python scripts/shapes_teacher.py
all`` and, if it is stopped, run it again. ``python scripts/shapes_teacher.py STAGE`` runs one stage.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "fewstep" / "assets" / "shapes_teacher"
#: the text encoder's width and depth; the tokenizer's length (the longest caption is 14 tokens with its marks)
TEXT_WIDTH, TEXT_LAYERS, MAX_TOKENS = 64, 3, 16
STAGES = ("text", "vae", "base", "unet", "asset")


# ----------------------------------------------------------------------------- resumable training
def _batches(split: str, start: int, batch: int, seed: int):
    """Scenes start.. of ``split`` as the shapes data source gives them: (images (B, 3, 64, 64) in [-1, 1], captions)."""
    from fewstep.data.shapes import ShapesDataset

    data = ShapesDataset(start + batch, split, seed=seed)
    items = [data[i] for i in range(start, start + batch)]
    return torch.stack([it["x0"] for it in items]), [it["prompt"] for it in items]


def _resume(root: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer) -> int:
    """Load the newest intact checkpoint under ``root`` into ``modules`` and ``opt``; its step (0 if none)."""
    from fewstep.checkpoint import latest_intact, load_checkpoint, unflatten_state

    path = latest_intact(root)
    if path is None:
        return 0
    groups, state = load_checkpoint(path)
    for name, module in modules.items():
        module.load_state_dict(groups[name])
    opt.load_state_dict(unflatten_state(state["optimizer"], groups["optimizer"]))
    print(f"resumed {root.name} at step {state['step']}")
    return int(state["step"])


def _save(root: Path, step: int, modules: dict[str, nn.Module], opt: torch.optim.Optimizer) -> None:
    from fewstep.checkpoint import flatten_state, save_checkpoint

    skeleton, tensors = flatten_state(opt.state_dict())
    groups = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
    save_checkpoint(root, step, {**groups, "optimizer": tensors}, {"step": step, "optimizer": skeleton})


def _loop(root: Path, modules: dict[str, nn.Module], opt, steps: int, lr: float, step_fn, every: int = 200) -> None:
    """Run ``step_fn(step) -> dict of floats`` from the resumed step to ``steps`` at learning rate ``lr`` (100 warm-up
    steps, then cosine to 0 at ``steps``), checkpointing every ``every``."""
    step = _resume(root, modules, opt)
    start, t0 = step, time.time()
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        logs = step_fn(step)
        step += 1
        if step % every == 0 or step == steps:
            _save(root, step, modules, opt)
            rate = (time.time() - t0) / (step - start)
            print(f"{root.name} {step}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in logs.items()) +
                  f" ({rate:.3f} s/step)", flush=True)


def _final(root: Path, modules: dict[str, nn.Module]) -> None:
    from fewstep.checkpoint import latest_intact, load_checkpoint

    groups, _ = load_checkpoint(latest_intact(root))
    for name, module in modules.items():
        module.load_state_dict(groups[name])


# ----------------------------------------------------------------------------- 1. text encoder
def tokenizer(work: Path):
    from transformers import CLIPTokenizer

    from fewstep.data.shapes import vocabulary
    from fewstep.testing.tokenizer import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(work / "tokenizer", vocabulary()),
                                         model_max_length=MAX_TOKENS)


def text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


class ImageTower(nn.Module):
    """The contrastive partner of the text encoder: four strided convolutions and a linear map to the joint space."""

    def __init__(self, width: int = 32, out: int = TEXT_WIDTH) -> None:
        super().__init__()
        layers, c = [], 3
        for w in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * 4 * 4, out)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def train_text(work: Path, steps: int, batch: int = 192, lr: float = 1e-3) -> None:
    tok = tokenizer(work)
    text = text_encoder(tok)
    tower, proj = ImageTower(), nn.Linear(TEXT_WIDTH, TEXT_WIDTH)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    holder = nn.ParameterDict({"log_scale": log_scale})
    modules = {"text": text, "tower": tower, "proj": proj, "scale": holder}
    opt = torch.optim.AdamW([p for m in modules.values() for p in m.parameters()], lr=lr, weight_decay=0.01)

    def step_fn(step: int) -> dict[str, float]:
        images, captions = _batches("train", step * batch, batch, seed=1)
        ids = tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        t = F.normalize(proj(text(ids).pooler_output), dim=-1)
        v = F.normalize(tower(images), dim=-1)
        logits = log_scale.clamp(max=math.log(100)).exp() * t @ v.T
        # captions repeat within a batch: every image whose caption is the same text is a positive
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        retrieval = same[torch.arange(batch), logits.argmax(1)].mean()  # caption -> an image with that caption
        return {"loss": loss.item(), "retrieval": retrieval.item()}

    _loop(work / "text", modules, opt, steps, lr, step_fn)


# ----------------------------------------------------------------------------- 2. VAE
def vae_model():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=16, sample_size=64)


def _object_weight(images: torch.Tensor, gain: float = 20.0) -> torch.Tensor:
    """Per-pixel loss weight 1 + gain * (saturation - 0.15)+ on (B, 3, H, W) in [-1, 1]: the objects, a few percent of
    the pixels and all of what a caption names, weigh about 10x the grey or beige background (without it, 2500 steps
    left reds and yellows orange and lost small objects on dark backgrounds: scorer colour 0.57 on reconstructions)."""
    x = (images + 1) / 2
    saturation = x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)
    return 1 + gain * (saturation - 0.15).clamp(min=0)


def train_vae(work: Path, steps: int, batch: int = 16, lr: float = 1e-3, kl_weight: float = 1e-6) -> None:
    vae = vae_model()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def step_fn(step: int) -> dict[str, float]:
        images, _ = _batches("train", step * batch, batch, seed=2)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = ((recon - images).abs() + (recon - images) ** 2).mul(_object_weight(images)).mean()
        kl = posterior.kl().mean()  # per image, summed over the latent
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"rec": rec.item(), "kl per pixel": kl.item() / images[0].numel()}

    _loop(work / "vae", {"vae": vae}, opt, steps, lr, step_fn)


@torch.no_grad()
def vae_adherence(vae, n: int = 300) -> dict[str, float]:
    """The scorer on the VAE's reconstructions (posterior means) of ``n`` held-out scenes: what the decoder keeps of
    each attribute, the ceiling of any sample decoded by it."""
    from fewstep.eval.shapes_score import adherence

    images, captions = _batches("seen", 5_000, n, seed=0)
    recon = torch.cat([vae.decode(vae.encode(images[i:i + 100]).latent_dist.mean).sample for i in range(0, n, 100)])
    return adherence(((recon.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy(), captions)


@torch.no_grad()
def latent_std(vae, n: int = 512) -> float:
    """The standard deviation of the VAE's latent means on ``n`` held-out scenes (SD's scaling factor rule)."""
    images, _ = _batches("seen", 0, n, seed=0)
    return float(vae.encode(images).latent_dist.mean.std())


# ----------------------------------------------------------------------------- 3. base pipeline
def unet_model():
    """SD 1.5's UNet layout (cross-attention in the upper levels, none at the bottom, SD's 32 norm groups) at three
    levels of 32/64/64 channels for 16 x 16 latents: 1.5M parameters, about 1 s a step at batch 64 on 2 cores."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=32)


def sd15_scheduler():
    """SD 1.5's noise schedule and prediction (stable-diffusion-v1-5 scheduler/scheduler_config.json: scaled_linear
    0.00085..0.012, 1000 steps, epsilon, steps_offset 1) in a DDIMScheduler with trailing timestep spacing: SD 1.5's
    PNDM with leading spacing starts a 1-step sample at t = 1, pure noise read as nearly clean (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", on sample steps), which the teacher-steps plot would show
    as an artefact of the grid, not of the model."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                         timestep_spacing="trailing")


def build_base(work: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    tok = tokenizer(work)
    text = text_encoder(tok)
    _final(work / "text", {"text": text})
    vae = vae_model()
    _final(work / "vae", {"vae": vae})
    std = latent_std(vae)
    print("VAE reconstructions, adherence:", {k: round(v, 4) for k, v in vae_adherence(vae).items()})
    vae.register_to_config(scaling_factor=round(1 / std, 5))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet_model(), scheduler=sd15_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = work / "base"
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"base pipeline at {out}: VAE latent std {std:.4f}, scaling_factor {1 / std:.5f}")
    return out


# ----------------------------------------------------------------------------- 4. UNet (fewstep's diffusion loss)
def train_unet(work: Path, overrides: list[str]) -> None:
    from fewstep.cli import main

    rc = main(["distill", str(ROOT / "recipes" / "shapes_teacher.yaml"), f"student.path={work / 'base'}",
               f"train.output_dir={work / 'unet'}", *overrides])
    if rc:
        sys.exit(rc)


def copy_asset(work: Path) -> None:
    final = work / "unet" / "final"
    if not (final / "model_index.json").is_file():
        sys.exit(f"{final} holds no trained pipeline: run the unet stage first")
    tmp = ASSET.with_name(ASSET.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # the single-file checkpoint for ComfyUI beside the diffusers folders is not shipped (the same weights again)
    shutil.copytree(final, tmp, ignore=lambda d, names: ["model.safetensors"] if Path(d) == final else [])
    card = ASSET / "README.md"
    keep = card.read_text() if card.is_file() else None
    if ASSET.exists():
        shutil.rmtree(ASSET)
    tmp.rename(ASSET)
    if keep is not None:  # the hand-written card with the measured scores stays
        card.write_text(keep)
    print(f"asset at {ASSET}: {sum(f.stat().st_size for f in ASSET.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=(*STAGES, "all"))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "shapes_teacher")
    p.add_argument("--text-steps", type=int, default=1200)
    p.add_argument("--vae-steps", type=int, default=3500)
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipes/shapes_teacher.yaml (unet stage)")
    args = p.parse_args(argv)
    todo = STAGES if args.stage == "all" else (args.stage,)
    for stage in todo:
        t0 = time.time()
        if stage == "text":
            train_text(args.work, args.text_steps)
        elif stage == "vae":
            train_vae(args.work, args.vae_steps)
        elif stage == "base":
            build_base(args.work)
        elif stage == "unet":
            train_unet(args.work, args.overrides)
        else:
            copy_asset(args.work)
        seconds = time.time() - t0
        print(f"stage {stage}: {seconds:.0f} s")
        times = args.work / "seconds.json"  # CPU-time accounting across resumed pieces
        spent = json.loads(times.read_text()) if times.is_file() else {}
        spent[stage] = spent.get(stage, 0.0) + seconds
        times.write_text(json.dumps(spent, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
