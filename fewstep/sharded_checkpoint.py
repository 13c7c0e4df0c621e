"""Checkpoints of a ``train.parallel: fsdp`` run, through ``torch.distributed.checkpoint`` (DCP).

``checkpoints/step-N/`` holds ``shards/`` (DCP: every process writes its own shards of the trained networks, the
EMA, the optimizer states and the loss's extra state; ``.metadata`` says where each piece lies) beside the small
files a one-process checkpoint has (LR schedules and RNG as safetensors, ``state.json`` with the sha256 of every
file, the shards included). Every process writes into one temporary directory; the main process hashes it and
renames it, so a crash leaves the whole checkpoint or none, as in fewstep.checkpoint. DCP reshards on load: a
checkpoint written by 2 processes resumes on 1 (and 1 on 2).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from .checkpoint import TrainState, checkpoint_path, save_checkpoint, trained_state
from .errors import FewstepError


def _bare(opt):
    """accelerate's AcceleratedOptimizer holds the torch optimizer DCP's helpers need."""
    return getattr(opt, "optimizer", opt)


class ShardedTrainState(TrainState):
    """TrainState whose ``save`` and ``restore`` every process calls together (collectives inside)."""

    def __init__(self, *, main: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.main = main
        # the optimizers' parameters by their names in one module, as DCP's optimizer state dicts want
        self.holder = nn.ModuleDict(self.networks)

    def _sharded(self, stepped: set[str]) -> dict[str, Any]:
        """What DCP writes or reads: networks, EMA, loss state, and the optimizers of ``stepped`` phases (DCP's
        helper initialises an empty optimizer's state by a zero step, which must not happen to one never stepped)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        out: dict[str, Any] = {"networks": {n: trained_state(m) for n, m in self.networks.items()}}
        if self.ema is not None:
            out["ema"] = self.ema.state_dict(self.ema_names)
        extra = self.loss.extra_state()
        if extra:
            out["loss"] = extra
        out["optim"] = {p: get_optimizer_state_dict(self.holder, _bare(o)) for p, o in self.optimizers.items()
                        if p in stepped}
        return out

    def save(self, root: Path, keep: int) -> Path | None:
        """Every process writes its shards; the main process finishes the checkpoint (its path; None elsewhere)."""
        import torch.distributed.checkpoint as dcp

        tmp = root / f".{checkpoint_path(root, self.step).name}.tmp-sharded"
        if self.main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        stepped = {p for p, o in self.optimizers.items() if any(_bare(o).state.values())}
        try:
            dcp.save(self._sharded(stepped), checkpoint_id=str(tmp / "shards"))
        except OSError as e:
            raise FewstepError(f"could not write the shards of checkpoint {tmp}: {e.strerror or e}; the previous "
                               "checkpoint is kept") from None
        dist.barrier()
        path = None
        if self.main:
            groups, skeletons = self._flat_groups(("sched",))
            meta = self._meta(skeletons, sharded=True, processes=dist.get_world_size(), stepped=sorted(stepped))
            path = save_checkpoint(root, self.step, groups, meta, keep=keep, tmp=tmp)
        dist.barrier()
        return path

    def restore(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        groups, state = self._open(path, sharded=True)
        stepped = set(state["stepped"])
        unknown = stepped - set(self.optimizers)
        if unknown:
            raise FewstepError(f"checkpoint {path} has optimizers of phases {sorted(unknown)} this loss does not run")
        target = self._sharded(stepped)
        try:
            dcp.load(target, checkpoint_id=str(path / "shards"))
        except Exception as e:  # DCP reports a missing or misfit key as a generic error
            line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise FewstepError(f"checkpoint {path} does not fit this run's networks: {line[:300]}") from None
        for phase in stepped:
            set_optimizer_state_dict(self.holder, _bare(self.optimizers[phase]), target["optim"][phase])
        if self.ema is not None:
            self.ema.updates = int(state["ema_updates"])  # the averages were loaded in place
        self.loss.load_extra_state(target.get("loss", {}))
        self._restore_rest(groups, state, ("sched",))


__all__ = ["ShardedTrainState"]
