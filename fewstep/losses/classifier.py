"""Cross-entropy classification: trains the digits feature network with the same loop as everything else."""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import FewstepError
from ..rng import SampleRNG
from .base import DistillationLoss, LossOutput


class ClassifierLoss(DistillationLoss):
    """CE(net(x0 + noise_std * eps), class_labels); the Gaussian input noise (per-sample RNG) makes the
    features tolerant of the small imperfections of generated samples."""

    def __init__(self, *, noise_std: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if noise_std < 0 or not 0 <= label_smoothing < 1:
            raise FewstepError("noise_std must be >= 0 and label_smoothing in [0, 1)")
        self.noise_std, self.label_smoothing = noise_std, label_smoothing

    def forward(self, phase, batch, student, teacher):
        if "class_labels" not in batch:
            raise FewstepError("loss classifier needs data with class_labels")
        x0 = batch["x0"].float()
        x = x0 + self.noise_std * SampleRNG(batch["seeds"], x0.device).randn(*x0.shape[1:])
        logits = student.net(x)
        loss = F.cross_entropy(logits, batch["class_labels"].long(), label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(1) == batch["class_labels"]).float().mean()
        return LossOutput(loss, {"accuracy": accuracy.detach()})
