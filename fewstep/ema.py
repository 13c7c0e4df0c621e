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

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


def ema_decay(decay: float, updates_before: int, warmup: bool = True) -> float:
    """The decay for the EMA update that follows ``updates_before`` earlier updates."""
    if not warmup:
        return decay
    if updates_before <= 0:
        return 0.0
    return min(decay, (1 + updates_before) / (10 + updates_before))


class EMA:
    """An exponential moving average of tensors (Polyak averaging): ``update(params)`` moves every average
    toward its tensor by 1 - decay_t, one ``torch._foreach_lerp_`` over all of them.

    ``averages``: the tensors that hold the average (default: float32 copies of ``params``); the consistency
    loss passes its target network's own parameters, so the target is the average itself. ``warmup``:
    decay_t as diffusers' ``EMAModel`` (``ema_decay``); ``False``: the fixed decay from the first update (LCM's
    target network). ``updates`` counts the updates so far (t of the warm-up; checkpointed by its owner).
    """

    def __init__(self, params: Sequence[Tensor], decay: float, *, warmup: bool = False,
                 averages: Sequence[Tensor] | None = None) -> None:
        self.decay, self.warmup = float(decay), bool(warmup)
        self.averages = list(averages) if averages is not None else [p.detach().float().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self, params: Sequence[Tensor]) -> None:
        d = ema_decay(self.decay, self.updates, self.warmup)
        torch._foreach_lerp_(self.averages, [p.detach().to(a.dtype) for a, p in zip(self.averages, params)], 1.0 - d)
        self.updates += 1

    def state_dict(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The averages by the names of the tensors they average (``updates`` is kept by the owner)."""
        return dict(zip(names, self.averages))

    def load_state_dict(self, state: dict[str, Tensor], names: Sequence[str], updates: int) -> None:
        device = self.averages[0].device if self.averages else None
        self.averages = [state[n].float().to(device) for n in names]
        self.updates = int(updates)

    @contextlib.contextmanager
    def swap_in(self, params: Sequence[Tensor]) -> Iterator[None]:
        """Within the block, ``params`` hold the averages (in their own dtype); their values come back after."""
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, a in zip(params, self.averages):
                p.copy_(a.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)


__all__ = ["EMA", "ema_decay"]
