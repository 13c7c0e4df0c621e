"""The decay of an exponential moving average of weights, with the warm-up published trainers use.

A fixed decay d from the first update leaves d^n of the initial weights after n updates (0.9999^20000 =
13.5 %). diffusers' ``EMAModel`` (``training_utils.py``, ``get_decay`` without ``use_ema_warmup``) instead
uses, for the update that follows t earlier ones,

    decay_t = 0                                  for t = 0 (the first update copies the weights)
    decay_t = min(d, (1 + t) / (10 + t))         for t >= 1

so early averages forget the initial weights quickly and the decay reaches d after about 9 / (1 - d)
updates ((1 + t) / (10 + t) = d at t = (10 d - 1) / (1 - d)). fewstep's loop uses this by default (``train.ema_warmup: true``); ``false`` gives the fixed d.
"""
from __future__ import annotations


def ema_decay(decay: float, updates_before: int, warmup: bool = True) -> float:
    """The decay for the EMA update that follows ``updates_before`` earlier updates."""
    if not warmup:
        return decay
    if updates_before <= 0:
        return 0.0
    return min(decay, (1 + updates_before) / (10 + updates_before))


__all__ = ["ema_decay"]
