"""Atomic, verifiable, resumable checkpoints.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding safetensors files (one per
group: trainable weights, EMA, loss-owned modules, optimizer and scheduler tensors, RNG states)
and ``state.json`` with the step, the non-tensor structure of every state dict, and the sha256 of
every file. It is written under a temporary name, fsynced, then renamed, so a crash leaves either
the whole checkpoint or none. On resume, a checkpoint whose files are missing or whose hashes
differ is reported and skipped, and the newest intact one is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .errors import FewstepError
from .networks import trainable
from .io import save_safetensors_atomic

PREFIX = "step-"
#: the layout TrainState writes; 2 since the loop redesign (issue 18): checkpoints of format 1 do not resume
FORMAT = 2


# ----------------------------------------------------------------------------- flatten any state dict
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split a nested structure into a JSON skeleton and its tensors (keys are dotted paths)."""
    tensors: dict[str, Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, Tensor):
            tensors[path] = o.detach().cpu().clone()
            return {"__tensor__": path}
        if isinstance(o, np.ndarray):
            tensors[path] = torch.from_numpy(o.copy())
            return {"__ndarray__": path}
        if isinstance(o, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(o.items())]}
        if isinstance(o, (list, tuple)):
            return {"__tuple__" if isinstance(o, tuple) else "__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, float) and not np.isfinite(o):
            return {"__float__": repr(o)}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot checkpoint a {type(o).__name__} at {path}")

    return walk(obj, prefix or "s"), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy()
        if "__float__" in skeleton:
            return float(skeleton["__float__"])
        if "__dict__" in skeleton:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__list__" in skeleton:
            return [unflatten_state(v, tensors) for v in skeleton["__list__"]]
    return skeleton


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Finished checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()),
                  key=lambda p: int(p.name[len(PREFIX):]))


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def save_checkpoint(root: Path, step: int, groups: dict[str, dict[str, Tensor]], state: dict[str, Any],
                    keep: int = 2, tmp: Path | None = None) -> Path:
    """Write ``groups`` (name -> tensors) and JSON ``state`` as checkpoint ``step``; keep the newest ``keep``.
    ``tmp``: a temporary directory that already holds other files of the checkpoint (a sharded one's shards,
    written by every process); they are hashed with the rest and renamed with it."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(root, step)
    if tmp is None:
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        hashes = {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        for name, tensors in groups.items():
            path = save_safetensors_atomic(tensors, tmp / f"{name}.safetensors")
            hashes[path.name] = _sha256(path)
        body = json.dumps({"step": step, "files": hashes, "state": state}, indent=1, sort_keys=True).encode()
        with open(tmp / "state.json", "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as e:  # a full disk, a quota, a vanished mount: the previous checkpoint stays the newest
        shutil.rmtree(tmp, ignore_errors=True)
        raise FewstepError(f"could not write checkpoint {final}: {e.strerror or e}; the previous checkpoint is kept "
                           "and the run can resume from it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when intact, else why not."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "state.json is missing or unreadable"
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """(groups, state) of an intact checkpoint; raise FewstepError if it is damaged."""
    problem = verify_checkpoint(path)
    if problem:
        raise FewstepError(f"checkpoint {path} is damaged: {problem}")
    meta = json.loads((path / "state.json").read_text())
    groups = {Path(name).stem: load_file(str(path / name)) for name in meta["files"]
              if "/" not in name and name.endswith(".safetensors")}
    return groups, meta["state"]


def latest_intact(root: Path, report=print) -> Path | None:
    """The newest intact checkpoint under ``root``; damaged newer ones are reported and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        report(f"fewstep: skipping damaged checkpoint {path.name}: {problem}")
    return None


# ----------------------------------------------------------------------------- a run's state
def trained_state(module: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint keeps of a network: its trainable parameters and its buffers (frozen base weights
    under LoRA adapters come from the model, not the checkpoint)."""
    return {**trainable(module), **dict(module.named_buffers())}


class TrainState:
    """Everything a run resumes from, and the one place that writes and reads it as a checkpoint.

    Groups (one safetensors file each): ``student`` and ``module.NAME`` (the trained networks' trained state),
    ``ema``, ``loss_state`` (the loss's ``extra_state``), ``optim.PHASE`` and ``sched.PHASE`` (tensors of the
    optimizer and LR-schedule state dicts), ``rng``; ``state.json`` holds the counters and every skeleton.
    """

    def __init__(self, *, networks: dict[str, nn.Module], optimizers: dict[str, Any], lr_schedulers: dict[str, Any],
                 loss: Any, ema: Any = None, ema_names: list[str] | None = None,
                 fingerprint: dict[str, Any] | None = None) -> None:
        self.networks, self.optimizers, self.lr_schedulers = networks, optimizers, lr_schedulers
        self.loss, self.ema, self.ema_names = loss, ema, list(ema_names or [])
        self.fingerprint = fingerprint or {}
        self.step = 0
        self.phase_steps = {p: 0 for p in optimizers}
        self.best: float | None = None

    @staticmethod
    def _group(name: str) -> str:
        return "student" if name == "student" else f"module.{name}"

    def _flat_groups(self, kinds: tuple[str, ...]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """The state dicts of ``kinds`` ("optim", "sched") by phase, and the RNG, split into tensors and skeletons."""
        groups, skeletons = {}, {}
        for kind in kinds:
            for phase, obj in {"optim": self.optimizers, "sched": self.lr_schedulers}[kind].items():
                skeletons[f"{kind}.{phase}"], tensors = flatten_state(obj.state_dict(), f"{kind}.{phase}")
                if tensors:
                    groups[f"{kind}.{phase}"] = tensors
        skeletons["rng"], groups["rng"] = flatten_state(rng_state(), "rng")
        return groups, skeletons

    def _meta(self, skeletons: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"format": FORMAT, "step": self.step, "phase_steps": self.phase_steps, "skeletons": skeletons,
                "fingerprint": self.fingerprint, "best": self.best,
                "ema_updates": self.ema.updates if self.ema is not None else 0, **more}

    def to_groups(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        groups = {self._group(n): trained_state(m) for n, m in self.networks.items()}
        if self.ema is not None:
            groups["ema"] = self.ema.state_dict(self.ema_names)
        extra = self.loss.extra_state()
        if extra:
            groups["loss_state"] = extra
        flat, skeletons = self._flat_groups(("optim", "sched"))
        return {**groups, **flat}, self._meta(skeletons)

    def save(self, root: Path, keep: int) -> Path:
        groups, state = self.to_groups()
        return save_checkpoint(root, self.step, groups, state, keep=keep)

    def _open(self, path: Path, sharded: bool) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """An intact checkpoint of this format and kind (sharded or not), or one line saying why it does not resume."""
        groups, state = load_checkpoint(path)
        if state.get("format") != FORMAT:
            raise FewstepError(f"checkpoint {path} was written by a fewstep before its loop redesign (format "
                               f"{state.get('format', 1)}, this one reads {FORMAT}) and cannot resume; start over with "
                               "train.overwrite=true, or finish the run with the fewstep version that wrote it")
        if bool(state.get("sharded")) != sharded:
            was, now = ("fsdp", "ddp") if state.get("sharded") else ("ddp", "fsdp")
            raise FewstepError(f"checkpoint {path} was written with train.parallel={was} and this run uses {now}; "
                               f"resume it with train.parallel={was}")
        return groups, state

    def _restore_rest(self, groups: dict[str, dict[str, Tensor]], state: dict[str, Any], kinds: tuple[str, ...]) -> None:
        """The flattened state dicts of ``kinds``, the RNG and the counters."""
        sk = state["skeletons"]
        for kind in kinds:
            for phase, obj in {"optim": self.optimizers, "sched": self.lr_schedulers}[kind].items():
                obj.load_state_dict(unflatten_state(sk[f"{kind}.{phase}"], groups.get(f"{kind}.{phase}", {})))
        set_rng_state(unflatten_state(sk["rng"], groups["rng"]))
        self.step = int(state["step"])
        self.phase_steps = dict(state["phase_steps"])
        self.best = state.get("best")

    def restore(self, path: Path) -> None:
        """Load checkpoint ``path`` into the networks, EMA, loss, optimizers, LR schedules and RNGs."""
        groups, state = self._open(path, sharded=False)
        for name, net in self.networks.items():
            saved = groups.get(self._group(name), {})
            if set(saved) != set(trained_state(net)):
                raise FewstepError(f"checkpoint {path} does not fit this {name} (different trainable parameters)")
            net.load_state_dict(saved, strict=False)
        if self.ema is not None:
            if "ema" not in groups:
                raise FewstepError(f"checkpoint {path} has no EMA weights but train.ema_decay is set")
            self.ema.load_state_dict(groups["ema"], self.ema_names, state["ema_updates"])
        self.loss.load_extra_state(groups.get("loss_state", {}))
        self._restore_rest(groups, state, ("optim", "sched"))
