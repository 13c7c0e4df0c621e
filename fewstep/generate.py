"""Generating samples from a trained model (a run's final/): shared by `fewstep sample`, `eval` and `bench`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import FewstepError


def default_device() -> torch.device:
    """Where a loaded model runs: the device accelerate picks for this process (``cuda:N`` on a GPU machine, else
    ``mps`` or ``cpu``), as the training loop's Accelerator does."""
    from accelerate import PartialState

    return PartialState().device


def cycling_conditions(denoiser, pipeline, num: int, *, class_label: int | None = None,
                       prompts: list[str] | None = None, device: torch.device | str = "cpu") -> dict | None:
    """Conditions for ``num`` samples: prompts cycling (pipelines; default the empty prompt), classes cycling
    0..C-1 or one ``class_label`` (class-conditional models; C, the null class index, samples unconditionally), or None."""
    if pipeline is not None:
        prompts = prompts or [""]
        return pipeline.encode_prompts([prompts[i % len(prompts)] for i in range(num)])
    null = denoiser.null_cond or {}
    if "class_labels" in null:
        n_cls = int(null["class_labels"].reshape(-1)[0])
        if class_label is not None and not 0 <= class_label <= n_cls:
            raise FewstepError(f"class must be in 0..{n_cls - 1}, or {n_cls} (the null class: unconditional), got {class_label}")
        labels = torch.full((num,), class_label) if class_label is not None else torch.arange(num) % max(n_cls, 1)
        return {"class_labels": labels.to(device)}
    if class_label is not None or prompts:
        raise FewstepError("this model is unconditional; give no class or prompts")
    return None


@dataclass
class Generator:
    """A loaded model and its default sampler; ``__call__`` draws samples (decoded images for pipelines)."""

    denoiser: Any
    meta: dict[str, Any]
    pipeline: Any = None
    #: where the model (the denoiser, and a pipeline's text encoders and VAE) runs
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, directory: str, device: str | torch.device | None = None) -> "Generator":
        """The model in ``directory`` on ``device`` (default: ``default_device()``, the GPU where there is one)."""
        from .export import load_final

        device = torch.device(device) if device is not None else default_device()
        den, meta, lp = load_final(directory, device=device)
        if meta["kind"] == "classifier":
            raise FewstepError(f"{directory} holds a classifier, not a generator")
        return cls(den, meta, lp, device)

    def noise(self, num: int, seed: int) -> Tensor:
        """The initial noise of ``num`` samples: drawn on the host from ``seed`` (the same on every device), moved."""
        return torch.randn(num, *self.meta["sample_shape"], generator=torch.Generator().manual_seed(seed)).to(self.device)

    def conditions(self, num: int, *, class_label: int | None = None, prompts: list[str] | None = None) -> dict | None:
        return cycling_conditions(self.denoiser, self.pipeline, num, class_label=class_label, prompts=prompts,
                                  device=self.device)

    @torch.no_grad()
    def __call__(self, num: int, *, seed: int = 0, steps: int | None = None, solver: str | None = None,
                 guidance: float | None = None, class_label: int | None = None, prompts: list[str] | None = None,
                 progress: bool = False) -> Tensor:
        from .sampling import sampler_grid, sampler_solver
        from .solvers import sample

        if num < 1 or (steps is not None and steps < 1):
            raise FewstepError("the number of samples and steps must be at least 1")
        s = self.meta["sampler"]
        if class_label is None:
            class_label = s.get("class_label")
        cond = self.conditions(num, class_label=class_label, prompts=prompts)
        x = self.noise(num, seed)
        g = guidance if guidance is not None else s.get("guidance")
        out = sample(self.denoiser, sampler_solver(s, seed=seed + 1, name=solver), x,
                     sampler_grid(self.denoiser.schedule, s, steps), cond,
                     guidance=g if cond is not None else None, progress=progress)
        if self.pipeline is not None:
            out = self.pipeline.decode_latents(out)
        return out.clamp(-1, 1) if out.ndim == 4 else out
