"""The logging window: what the loop logs every ``train.log_every`` steps, averaged over the steps since the last row."""
from __future__ import annotations

import time
from typing import Any

#: keys every phase logs; a multi-phase loss also gets them per phase, as PHASE/KEY
SHARED_KEYS = ("loss", "lr", "grad_norm")


class LogWindow:
    """Sums of logged values and how many steps logged each, since the last ``row``.

    A phase's own key (``fake_score_loss``) is averaged over the steps that logged it; with several phases the
    shared keys (SHARED_KEYS) are also kept per phase as ``PHASE/KEY``. ``it_s``: steps per second in the window.
    """

    def __init__(self, multi_phase: bool) -> None:
        self.multi_phase = multi_phase
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.start = 0, now

    def add(self, logs: dict[str, Any]) -> None:
        """One step's logs (with its ``phase``); values may be floats or 0-d tensors (summed without a sync)."""
        self.steps += 1
        for k, v in logs.items():
            if k == "phase":
                continue
            keys = (k, f"{logs['phase']}/{k}") if self.multi_phase and k in SHARED_KEYS else (k,)
            for key in keys:
                self.sums[key] = self.sums.get(key, 0.0) + v
                self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, Any]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def close(self) -> tuple[dict[str, Any], float]:
        """(the window's means, its steps per second); a new window starts."""
        now = time.monotonic()
        out = self.means(), self.steps / max(now - self.start, 1e-9)
        self._reset(now)
        return out
