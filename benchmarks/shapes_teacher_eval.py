"""The shapes text-to-image teacher measured as users would sample it: plain diffusers
(``StableDiffusionPipeline.from_pretrained`` on fewstep/assets/shapes_teacher, nothing of fewstep in the sampling),
at each step count, on held-out captions of seen combinations and of never-seen ones: adherence per attribute
(fewstep/eval/shapes_score.py) and Fréchet distance in the shapes feature network's space against held-out renders.

    python benchmarks/shapes_teacher_eval.py [--model DIR] [--steps 1,2,4,8,25] [--num 400] [--seed 0]
        [--guidance 4.0] [--out runs/shapes_teacher_eval]

Writes report.json, report.md and adherence_fd.png into --out (a new directory).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fewstep.data.shapes import scene, to_model_range
from fewstep.eval.shapes_score import ATTRIBUTES, adherence

ASSET = Path(__file__).resolve().parents[1] / "fewstep" / "assets" / "shapes_teacher"


@torch.no_grad()
def sample(pipe, captions: list[str], steps: int, guidance: float, seed: int, batch: int = 100) -> np.ndarray:
    """(N, 64, 64, 3) in [0, 1] from the pipeline's own call; one generator seeded per batch."""
    out = []
    for i in range(0, len(captions), batch):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        out.append(pipe(captions[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                        output_type="np").images)
    return np.concatenate(out)


def main() -> None:
    from diffusers import StableDiffusionPipeline

    from fewstep.eval.evaluate import evaluate, make_extractor, reference_from

    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ASSET))
    p.add_argument("--steps", default="1,2,4,8,25")
    p.add_argument("--num", type=int, default=400, help="captions per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--out", type=Path, default=Path("runs/shapes_teacher_eval"))
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new --out")
    torch.set_grad_enabled(False)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    extract, protocol = make_extractor("shapes")
    reference = reference_from("shapes:seen:2000", extract)
    rows = []
    for split in ("seen", "unseen"):
        captions = [scene(i, split).caption for i in range(10_000, 10_000 + args.num)]  # not the reference's scenes
        for steps in [int(s) for s in args.steps.split(",")]:
            t0 = time.time()
            images = sample(pipe, captions, steps, args.guidance, args.seed)
            scores = adherence(images, captions)
            fd = evaluate(to_model_range(images), extract, reference, with_kid=False, with_pr=False)["fd"]
            rows.append({"split": split, "steps": steps, "fd": fd, **scores, "seconds": time.time() - t0})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True)
    meta = {"model": args.model, "num": args.num, "seed": args.seed, "guidance": args.guidance,
            "scheduler": type(pipe.scheduler).__name__, "features": protocol, "reference": reference[3]}
    (args.out / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    attrs = [a for a in ATTRIBUTES if any(a in r for r in rows)]
    lines = [f"guidance {args.guidance}, {args.num} captions per split, seed {args.seed}, {meta['scheduler']}", "",
             f"| split | steps | FD | {' | '.join(attrs)} | all |", "|---|---|---|" + "---|" * (len(attrs) + 1)]
    for r in rows:
        lines.append(f"| {r['split']} | {r['steps']} | {r['fd']:.2f} | " +
                     " | ".join(f"{r[a]:.3f}" if a in r else "" for a in attrs) + f" | {r['overall']:.3f} |")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "adherence_fd.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("seen", "-"), ("unseen", "--")):
        rs = [r for r in rows if r["split"] == split]
        steps = [r["steps"] for r in rs]
        for attr in ("colour", "shape", "position", "overall"):
            if all(attr in r for r in rs):
                a1.plot(steps, [r[attr] for r in rs], style, marker="o", label=f"{attr} ({split})")
        a2.plot(steps, [r["fd"] for r in rs], style, marker="o", label=split)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("teacher steps (DDIM, log scale)")
    a1.set_ylabel("adherence")
    a1.legend(fontsize=7)
    a2.set_ylabel("Fréchet distance (shapes features)")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
