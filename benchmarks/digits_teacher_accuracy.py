"""Does the digits teacher draw the digit it is asked for?

A logistic-regression classifier fitted on sklearn digits labels the teacher's class-conditional
samples (sampled with the model's own solver, steps and guidance unless given).

    python benchmarks/digits_teacher_accuracy.py runs/digits_teacher/final [--per-class 100] [--guidance 2.0]
"""
from __future__ import annotations

import argparse

import torch

from fewstep.eval.digits_classifier import class_accuracy, fit_digits_classifier, sample_classes
from fewstep.export import load_final


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    args = ap.parse_args()
    den, meta, _ = load_final(args.model)
    s = meta["sampler"]
    steps = args.steps or s["steps"]
    guidance = args.guidance if args.guidance is not None else s["guidance"]
    clf = fit_digits_classifier()
    with torch.no_grad():
        x, y = sample_classes(den, per_class=args.per_class, steps=steps, guidance=guidance, solver=s["solver"])
    acc, per = class_accuracy(clf, x, y)
    print(f"{args.model}: {s['solver']} {steps} steps, guidance {guidance}, {len(y)} samples")
    print("per class: " + " ".join(f"{c}:{a:.2f}" for c, a in enumerate(per)))
    print(f"accuracy: {acc:.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
