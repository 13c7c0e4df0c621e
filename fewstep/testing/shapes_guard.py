"""The shapes teacher's guard: a handful of held-out single-object captions sampled through plain diffusers and scored
for colour and shape (fewstep/eval/shapes_score.py), and the same run with one deliberate defect of the text-to-image
path at a time, each a mistake that passes every plumbing test:

- ``uncond_swapped``: the conditional and unconditional (empty-prompt) embeddings exchanged in classifier-free
  guidance, so guidance pushes away from the prompt;
- ``vae_scaling``: latents decoded with SD 1.5's scaling factor 0.18215 instead of this VAE's own;
- ``guidance_off_by_one``: guidance_scale taken as w where the pipeline's formula means 1 + w (LCM's w against
  diffusers' guidance_scale; fewstep/losses/consistency.py), i.e. the guidance one lower.

tests/test_shapes_teacher.py asserts the guard and its failures; benchmarks/shapes_guard_spread.py measures the seed
spread its thresholds come from."""
from __future__ import annotations

import numpy as np
import torch

from ..data.shapes import scene
from ..errors import lookup
from ..eval.shapes_score import adherence

VARIANTS = ("ok", "uncond_swapped", "vae_scaling", "guidance_off_by_one")
#: SD 1.5's VAE scaling factor: the constant a pipeline assembled from SD parts might carry over
SD15_SCALING = 0.18215
GUIDANCE, STEPS = 4.0, 25


def guard_prompts(num: int = 12) -> list[str]:
    """The first ``num`` single-object captions of the held-out ``seen`` split from scene 20000 on (captions of
    combinations seen in training, images never seen; no scene the evaluation or the reference uses)."""
    out, i = [], 20_000
    while len(out) < num:
        s = scene(i, "seen")
        if s.kind == "single":
            out.append(s.caption)
        i += 1
    return out


@torch.no_grad()
def guard_images(pipe, prompts: list[str], variant: str, seed: int, steps: int = STEPS,
                 guidance: float = GUIDANCE) -> np.ndarray:
    """(N, H, W, 3) in [0, 1]: the pipeline's own call, with ``variant``'s defect (see the module docstring)."""
    lookup({v: v for v in VARIANTS}, variant, "guard variant")
    g = torch.Generator().manual_seed(seed)
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "generator": g, "output_type": "np"}
    if variant == "guidance_off_by_one":
        kwargs["guidance_scale"] = guidance - 1
    if variant == "uncond_swapped":
        cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, True)
        return pipe(prompt_embeds=uncond, negative_prompt_embeds=cond, **kwargs).images
    if variant == "vae_scaling":
        own = pipe.vae.config.scaling_factor
        pipe.vae.register_to_config(scaling_factor=SD15_SCALING)
        try:
            return pipe(prompts, **kwargs).images
        finally:
            pipe.vae.register_to_config(scaling_factor=own)
    return pipe(prompts, **kwargs).images


def guard_score(pipe, variant: str = "ok", seed: int = 0, num: int = 12) -> float:
    """Mean of the colour and shape pass rates of ``num`` guard prompts under ``variant``."""
    prompts = guard_prompts(num)
    scores = adherence(guard_images(pipe, prompts, variant, seed), prompts)
    return (scores["colour"] + scores["shape"]) / 2
