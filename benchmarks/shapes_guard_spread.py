"""The seed spread of the shapes teacher's guard (fewstep/testing/shapes_guard.py): its score under each variant for
seeds 0..S-1, mean and standard deviation; tests/test_shapes_teacher.py takes its thresholds from these numbers.

    python benchmarks/shapes_guard_spread.py [--seeds 8] [--model DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fewstep.testing.shapes_guard import VARIANTS, guard_score

ASSET = Path(__file__).resolve().parents[1] / "fewstep" / "assets" / "shapes_teacher"


def main() -> None:
    from diffusers import StableDiffusionPipeline

    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--model", default=str(ASSET))
    args = p.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for variant in VARIANTS:
        t0 = time.time()
        scores = [guard_score(pipe, variant, seed) for seed in range(args.seeds)]
        print(f"{variant}: mean {np.mean(scores):.4f} std {np.std(scores, ddof=1):.4f} min {min(scores):.4f} "
              f"max {max(scores):.4f} ({(time.time() - t0) / args.seeds:.2f} s a run) {[round(s, 3) for s in scores]}",
              flush=True)


if __name__ == "__main__":
    main()
