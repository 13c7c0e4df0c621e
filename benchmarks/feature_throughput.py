"""Feature-extraction throughput (images/s) on this machine: the FID Inception (random weights: the
same arithmetic as the real ones) with and without "clean" resizing, and the digits network.

    python benchmarks/feature_throughput.py [--batch 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewstep.eval.digits_net import digits_features, load_digits_net
from fewstep.eval.inception import FIDInceptionV3
from fewstep.eval.preprocess import preprocess


def rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    b = args.batch
    net = FIDInceptionV3().eval()
    images = torch.rand(b, 3, 64, 64) * 2 - 1
    ready = preprocess(images, "clean") / 127.5 - 1
    digits = load_digits_net()
    small = torch.rand(4096, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        rows = [
            ("Inception pool3, 299x299 input", rate(lambda: net(ready), b, args.repeats)),
            ("clean resize 64 -> 299 (PIL, per channel)", rate(lambda: preprocess(images, "clean"), b, args.repeats)),
            ("Inception incl. clean resize", rate(lambda: net(preprocess(images, "clean") / 127.5 - 1), b, args.repeats)),
            ("digits network, 8x8", rate(lambda: digits_features(digits, small), len(small), args.repeats)),
        ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b} (digits: 4096), median of {args.repeats}")
    print(f"{'extractor':<46}{'images/s':>12}")
    for name, r in rows:
        print(f"{name:<46}{r:>12.1f}")
    print(f"ratio digits network / Inception incl. resize: {rows[3][1] / rows[2][1]:.0f}x")


if __name__ == "__main__":
    main()
