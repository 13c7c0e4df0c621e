"""GAN objectives on discriminator logits (Goodfellow et al. 2014; hinge: Lim & Ye 2017)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import check_choice

GAN_LOSSES = ("hinge", "non_saturating")


def discriminator_loss(d_real: Tensor, d_fake: Tensor, kind: str) -> Tensor:
    """hinge: relu(1 - D(real)) + relu(1 + D(fake)); non_saturating: softplus(-D(real)) + softplus(D(fake))."""
    check_choice(kind, GAN_LOSSES, "gan_loss")
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def generator_loss(d_fake: Tensor, kind: str) -> Tensor:
    """hinge: -D(fake); non_saturating: softplus(-D(fake))."""
    check_choice(kind, GAN_LOSSES, "gan_loss")
    if kind == "hinge":
        return -d_fake.mean()
    return F.softplus(-d_fake).mean()
