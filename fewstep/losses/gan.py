"""GAN objectives on discriminator logits (Goodfellow et al. 2014; hinge: Lim & Ye 2017)."""
from __future__ import annotations

from collections.abc import Callable

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


def critic_step(D: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, kind: str) -> tuple[Tensor, dict[str, Tensor]]:
    """The discriminator's objective on real and (detached) fake inputs, with what to log: ``disc_loss`` and
    ``disc_accuracy`` (the fraction of real inputs scored > 0 and fake ones < 0). Consistency's adversarial
    variant and f-distill's fake-score phase both take their discriminator step through here."""
    d_real, d_fake = D(real), D(fake)
    loss = discriminator_loss(d_real, d_fake, kind)
    accuracy = 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean())
    return loss, {"disc_loss": loss.detach(), "disc_accuracy": accuracy.detach()}
