"""Atomic file writes: write beside, fsync, rename. A crash never leaves a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_safetensors_atomic(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save contiguous CPU copies of ``tensors`` to ``path`` atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    return _atomic(Path(path), lambda f: f.write(data))


def write_text_atomic(text: str, path: str | Path) -> Path:
    return _atomic(Path(path), lambda f: f.write(text.encode()))


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    return _atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


__all__ = ["save_safetensors_atomic", "write_json_atomic", "write_text_atomic"]
