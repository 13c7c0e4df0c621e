"""Text conditions of a fixed prompt list, encoded once and looked up after.

A prompt-only loss (DMD, f-distill on ``data: prompts``) otherwise runs the text encoder(s) on every batch, though
its prompts come from a finite list that repeats every epoch. The table encodes the list's distinct prompts at its
first use, in sorted order and fixed chunks, so a prompt's condition does not depend on the batch it arrived in:
a resumed run looks up exactly what the uninterrupted one did. Rows live on the CPU and move to the encoder's
device per batch (a few MB). For prompt sets too large to hold, precompute them in the latent cache (fewstep.data.cache) instead.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

Encode = Callable[[list[str]], dict[str, Tensor]]


class PromptTable:
    """``table(prompts) -> {key: (B, ...)}``: ``encode(prompts)``'s output for prompts of ``prompts``, each distinct
    prompt encoded once (lazily, at the first call, in chunks of ``chunk``); a prompt outside the list is encoded
    with its batch, as without the table."""

    def __init__(self, prompts: list[str], encode: Encode, *, chunk: int = 64, progress: bool = False) -> None:
        self.encode, self.chunk, self.progress = encode, chunk, progress
        self.prompts = sorted(set(prompts))
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.rows: dict[str, Tensor] | None = None
        self.device = torch.device("cpu")

    def _fill(self) -> None:
        parts: dict[str, list[Tensor]] = {}
        starts = range(0, len(self.prompts), self.chunk)
        for i in tqdm(starts, desc="encoding prompts", disable=not self.progress or len(starts) < 2):
            for k, v in self.encode(self.prompts[i:i + self.chunk]).items():
                self.device = v.device  # the encoder's: rows go back there per batch
                parts.setdefault(k, []).append(v.detach().cpu())
        self.rows = {k: torch.cat(v) for k, v in parts.items()}

    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        if any(p not in self.index for p in prompts):
            return self.encode(prompts)
        if self.rows is None:
            self._fill()
        idx = torch.tensor([self.index[p] for p in prompts])
        return {k: v[idx].to(self.device) for k, v in self.rows.items()}
