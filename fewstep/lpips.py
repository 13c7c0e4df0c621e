"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG-16 variant,
written here so fewstep never imports torchvision.

d(x, y) = sum_l mean_hw || w_l * (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|) ||^2 over the VGG-16 activations
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of inputs in [-1, 1] shifted and scaled per channel.

Weights: one safetensors file (default ``$FEWSTEP_WEIGHTS_DIR/lpips_vgg.safetensors``) with this
module's parameter names. ``python -m fewstep.lpips VGG16_PTH LPIPS_VGG_PTH OUT`` converts the
public files (torchvision's vgg16 ImageNet weights and the lpips package's vgg.pth linear layers),
reading them with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import FewstepError

FILE_NAME = "lpips_vgg.safetensors"
#: VGG-16 "D" configuration: conv widths, "M" = 2x2 max-pool
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices (in the conv/relu/pool sequence) of relu1_2 ... relu5_3
WIDTHS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """Per-sample LPIPS distance (B,) between image batches in [-1, 1], shape (B, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in WIDTHS])
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def taps(self, x: Tensor) -> list[Tensor]:
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)
            if i == TAPS[-1]:
                break
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        total = torch.zeros(x.shape[0], device=x.device)
        for fx, fy, lin in zip(self.taps(x.float()), self.taps(y.float()), self.lins):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((nx - ny) ** 2).mean((1, 2, 3))
        return total


def default_path() -> Path:
    return Path(os.environ.get("FEWSTEP_WEIGHTS_DIR", Path.home() / ".cache" / "fewstep")) / FILE_NAME


def check_weights(path: str | Path | None = None) -> Path:
    """The weights file ``path`` (default: $FEWSTEP_WEIGHTS_DIR/lpips_vgg.safetensors), refused if absent."""
    path = Path(path) if path else default_path()
    if not path.is_file():
        raise FewstepError(f"LPIPS weights {path} not found; convert them with `python -m fewstep.lpips VGG16_PTH "
                           f"LPIPS_VGG_PTH {path}` (or set loss.lpips_weights / FEWSTEP_WEIGHTS_DIR)")
    return path


def load_lpips(path: str | Path | None = None) -> LPIPS:
    """LPIPS with weights from ``path`` (default: $FEWSTEP_WEIGHTS_DIR/lpips_vgg.safetensors)."""
    from safetensors.torch import load_file

    path = check_weights(path)
    model = LPIPS()
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FewstepError(f"{path} does not hold LPIPS-VGG weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def convert(vgg_state: dict[str, Tensor], lin_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision vgg16 ``features.N.*`` and lpips ``linK.model.1.weight`` names onto LPIPS'."""
    out = {}
    for k, v in vgg_state.items():
        if k.startswith("features.") and int(k.split(".")[1]) <= TAPS[-1]:
            out[k] = v
    for i in range(len(WIDTHS)):
        out[f"lins.{i}.weight"] = lin_state[f"lin{i}.model.1.weight"]
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m fewstep.lpips VGG16_PTH LPIPS_VGG_PTH OUT.safetensors", file=sys.stderr)
        return 2
    from .io import save_safetensors_atomic

    vgg = torch.load(argv[0], map_location="cpu", weights_only=True)
    lin = torch.load(argv[1], map_location="cpu", weights_only=True)
    save_safetensors_atomic(convert(vgg, lin), argv[2])
    print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
