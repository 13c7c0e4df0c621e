"""One live run per output directory: an advisory ``flock`` on ``DIR/.lock``, held by a run's main process.

The kernel drops a ``flock`` when its holder exits, however it exits (SIGKILL, OOM, a crash), so a killed run never
leaves the directory locked; the file stays and says who held it last. A launch's other processes take no lock:
they follow their main process, which refuses the whole launch when another run is live there. What it cannot see:
a run on another machine writing the same directory over a network filesystem whose ``flock`` is local to each
client (NFS before v4 without lock support, some FUSE mounts); a run started by a fewstep from before 2026-12-08.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import FewstepError

LOCK_NAME = ".lock"
#: the locks this process holds, by directory
_HELD: dict[Path, int] = {}


def acquire(directory: Path, key: str = "train.output_dir") -> None:
    """Lock ``directory`` (which must exist) for this process; refuse in one line when another process holds it.
    Taking a lock this process already holds is a no-op."""
    directory = Path(directory).resolve()
    if directory in _HELD:
        return
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 400).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise FewstepError(f"{key} {directory} is in use by a live run ({holder}); wait for it to finish or stop it, "
                           f"or give another {key}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n".encode(), 0)
    _HELD[directory] = fd


def release(directory: Path) -> None:
    fd = _HELD.pop(Path(directory).resolve(), None)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Release, on leaving, the locks taken inside (a run's; process exit releases them too). A run started inside
    another (a feature network trained on first use) leaves the outer run's lock held."""
    before = set(_HELD)
    try:
        yield
    finally:
        for directory in set(_HELD) - before:
            release(directory)
