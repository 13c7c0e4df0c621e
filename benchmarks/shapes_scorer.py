"""Validate the shapes adherence scorer (fewstep/eval/shapes_score.py) on held-out procedural renders, clean and
degraded (fewstep/eval/degrade.py): the pass rate of every attribute per split and degradation, against the data's
own ground truth (every caption is true of its render). Prints a markdown table; docs/t2i.md quotes it.

    python benchmarks/shapes_scorer.py [--num 2000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from fewstep.data.shapes import render, scene
from fewstep.eval.degrade import DEGRADATIONS, degrade
from fewstep.eval.shapes_score import ATTRIBUTES, adherence


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num", type=int, default=2000, help="scenes per split")
    args = p.parse_args()
    t0 = time.time()
    print(f"| split | degradation | {' | '.join(ATTRIBUTES)} | all |")
    print("|---|---|" + "---|" * (len(ATTRIBUTES) + 1))
    for split in ("seen", "unseen"):
        scenes = [scene(i, split) for i in range(args.num)]
        clean = [render(s) for s in scenes]
        captions = [s.caption for s in scenes]
        for name in ("none", *DEGRADATIONS):
            rng = np.random.default_rng(0)
            images = np.stack(clean if name == "none" else [degrade(img, name, rng) for img in clean])
            r = adherence(images, captions)
            cells = [f"{r[a]:.4f} ({r['n_' + a]})" if a in r else "" for a in ATTRIBUTES]
            print(f"| {split} | {name} | {' | '.join(cells)} | {r['overall']:.4f} |", flush=True)
    print(f"\n{args.num} scenes per split; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
