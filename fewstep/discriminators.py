"""Discriminators on noisy samples (x_t, t), for the adversarial consistency variant and f-distill's
density ratio on toy and small image models. Logits, shape (B,).

Vectors: an MLP on [x_t, sinusoidal(t)]. Images: a small conv net whose channels get a projection of
the time embedding. Class-conditional models: a projection term <embed(y), h> (Miyato & Koyama 2018).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def time_features(t: Tensor, dim: int = 32, T: float = 1000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float().reshape(-1, 1) / T * 1000.0) * freqs
    return torch.cat([args.sin(), args.cos()], 1)


class XTDiscriminator(nn.Module):
    """D(x_t, t[, y]) -> logit."""

    def __init__(self, shape: Sequence[int], *, width: int = 128, num_classes: int = 0, time_dim: int = 32) -> None:
        super().__init__()
        self.shape, self.time_dim = tuple(shape), time_dim
        if len(self.shape) == 1:
            self.body = nn.Sequential(nn.Linear(self.shape[0] + time_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
            self.film = None
        else:
            c = self.shape[0]
            self.body = nn.Sequential(
                nn.Conv2d(c, width // 2, 3, padding=1), nn.SiLU(),
                nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.film = nn.Linear(time_dim, width)
        self.head = nn.Linear(width, 1)
        self.embed = nn.Embedding(num_classes + 1, width) if num_classes else None

    @classmethod
    def for_denoiser(cls, den, **kwargs) -> "XTDiscriminator":
        """A discriminator shaped for a denoiser's samples (MLPNet: vectors; UNets: images)."""
        cfg = den.net.config
        if den.sample_shape is not None:  # a pipeline denoiser's latent shape (FLUX.1: unpacked)
            shape, classes = den.sample_shape, 0
        elif hasattr(cfg, "dim"):
            shape = (cfg.dim,)
            classes = getattr(cfg, "num_classes", 0) or 0
        else:
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            shape = (cfg.in_channels, size, size)
            classes = (getattr(cfg, "num_class_embeds", None) or 1) - 1
        return cls(shape, num_classes=max(classes, 0), **kwargs)

    def forward(self, x_t: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        emb = time_features(t.to(x_t.device), self.time_dim)
        if self.film is None:
            h = self.body(torch.cat([x_t.float(), emb], 1))
        else:
            h = self.body(x_t.float()) + self.film(emb)
        out = self.head(h).sum(1)  # not squeeze: a view out of an FSDP2 unit would lose its pre-backward hook
        labels = (cond or {}).get("class_labels")
        if self.embed is not None and labels is not None:
            out = out + (self.embed(labels.long()) * h).sum(1)
        return out


class _TeacherFeatures(nn.Module):
    """The features one module of a frozen teacher's network produces at (x_t, t, c), kept by a forward hook. The
    teacher is not a submodule: only a subclass's head is trained and checkpointed; gradients still flow through the
    teacher to x_t. ``pick``: which element of a tuple output to keep."""

    def __init__(self, denoiser, module: nn.Module, pick: int) -> None:
        super().__init__()
        object.__setattr__(self, "_den", denoiser)
        self._pick = pick
        self._features: Tensor | None = None
        module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._features = output[self._pick] if isinstance(output, tuple) else output

    def features(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Tensor:
        self._den.native(x_t, t, cond)
        feats, self._features = self._features, None
        return feats


class FeatureDiscriminator(_TeacherFeatures):
    """A head on a frozen UNet's mid-block features at (x_t, t, c) (DMD2 puts its classifier on the fake
    score's bottleneck; fewstep uses the frozen teacher's, so the features do not drift)."""

    def __init__(self, denoiser, *, width: int = 128) -> None:
        super().__init__(denoiser, denoiser.net.mid_block, pick=0)
        channels = denoiser.net.config.block_out_channels[-1]
        self.head = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1),
        )

    def forward(self, x_t: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        feats = self.features(x_t, t, cond)
        return self.head(feats.float()).sum(1)  # one logit per sample, not a view (see XTDiscriminator)


def transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """A flow transformer's blocks in order: SD3's joint blocks; FLUX.1's joint then single-stream blocks."""
    return [*getattr(net, "transformer_blocks", []), *getattr(net, "single_transformer_blocks", [])]


class TokenFeatureDiscriminator(_TeacherFeatures):
    """A head on a frozen flow transformer's image-token features at (x_t, t, c), from its middle block (index
    num_blocks // 2, FastGen's default for FLUX.1: fastgen/networks/discriminators.py, Discriminator_ImageDiT; its
    FLUX.1 DMD2 also reads the teacher's features). The tokens (B, H/2 * W/2, D) are laid out as the (H/2, W/2) patch
    grid they come from; the head: a 4x4 stride-2 convolution to D/2 channels, group norm, leaky ReLU, a 1x1
    convolution to one channel, averaged."""

    def __init__(self, denoiser, *, block: int | None = None) -> None:
        blocks = transformer_blocks(denoiser.net)
        block = len(blocks) // 2 if block is None else int(block)
        super().__init__(denoiser, blocks[block], pick=1)  # a block returns (text, image) tokens: the image's
        self.block = block
        dim = int(denoiser.net.config.num_attention_heads * denoiser.net.config.attention_head_dim)
        hidden = max(dim // 2, 1)
        self.head = nn.Sequential(
            nn.Conv2d(dim, hidden, 4, stride=2, padding=1), nn.GroupNorm(math.gcd(32, hidden), hidden),
            nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x_t: Tensor, t: Tensor, cond: dict | None = None) -> Tensor:
        tokens = self.features(x_t, t, cond)
        h, w = x_t.shape[-2] // 2, x_t.shape[-1] // 2
        grid = tokens.float().transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        return self.head(grid).sum(1)  # one logit per sample, not a view (see XTDiscriminator)
