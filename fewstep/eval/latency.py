"""Latency as the field should report it: warm-up excluded, device synchronized, median and p90 over
repeats, batch 1, with the split between text encoding, denoiser steps and VAE decode."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

PARTS = ("text_encoder", "denoiser", "vae_decode")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PartTimer:
    """Times named parts of one run; ``part(name)`` is a context manager."""

    def __init__(self) -> None:
        self.times = {p: 0.0 for p in PARTS}

    def part(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                _sync()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                _sync()
                timer.times[name] += time.perf_counter() - self.start

        return _Ctx()


def measure(run: Callable[[PartTimer], None], *, warmup: int = 3, repeats: int = 20) -> dict[str, float]:
    """Run ``run(timer)`` warmup + repeats times; report the timed repeats only (seconds)."""
    for _ in range(warmup):
        run(PartTimer())
    totals, parts = [], {p: [] for p in PARTS}
    for _ in range(repeats):
        timer = PartTimer()
        _sync()
        start = time.perf_counter()
        run(timer)
        _sync()
        totals.append(time.perf_counter() - start)
        for p in PARTS:
            parts[p].append(timer.times[p])
    ordered = sorted(totals)
    out = {"median_s": statistics.median(totals), "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
           "repeats": repeats, "warmup": warmup}
    out.update({f"{p}_s": statistics.median(parts[p]) for p in PARTS})
    return out


def interleaved(first: Callable[[], None], second: Callable[[], None], *, steps: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    """Time ``first`` and ``second`` alternately (so machine noise hits both); seconds per call, warm-up excluded."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(steps):
        for fn, out in ((first, a), (second, b)):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            out.append(time.perf_counter() - start)
    return a, b
