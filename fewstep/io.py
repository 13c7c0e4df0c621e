"""Atomic writes: write beside, fsync, rename. A crash never leaves a half-written file or report."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

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


PARTIAL = ".partial-"


def partial_siblings(path: str | Path) -> list[Path]:
    """Temporary siblings ``.NAME.partial-*`` that ``atomic_dir`` left for ``path`` (a killed process)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}{PARTIAL}*")) if path.parent.is_dir() else []


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to ``path`` only if the block completes.

    On any exception the sibling is removed, so a failed run leaves neither ``path`` nor a temporary;
    siblings left by a killed process are removed on the next call. ``path`` must not exist, or be an
    empty directory (the caller refuses a complete one: nothing is overwritten).
    """
    path = Path(path)
    for stale in partial_siblings(path):
        shutil.rmtree(stale, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # as a plain mkdir would make it (mkdtemp makes 0700)
    try:
        yield tmp
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        os.rename(tmp, path)  # fails (nothing lost) if another process completed `path` meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_dir", "partial_siblings", "save_safetensors_atomic", "write_json_atomic", "write_text_atomic"]
