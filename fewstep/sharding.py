"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), ``train.parallel: fsdp``.

Nothing here shards by itself: FSDP2 turns every parameter of a network into a DTensor holding 1/N of it,
gathers a block's parameters for its forward and backward, and reduce-scatters (averages) the gradients. This
module only says which modules become FSDP units, re-points the optimizers built over the unsharded parameters,
and gathers whole weights for the main process's sampling and export. Checkpoints go through
``torch.distributed.checkpoint`` (fewstep.sharded_checkpoint.ShardedTrainState).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import FewstepError


#: the collective backends of a one-process group by the device its tensors live on: FSDP2 gathers the device's
#: tensors (gloo takes host tensors only; NCCL is CUDA's), checkpoints and barriers use host tensors (gloo)
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl"}


def process_group(device: torch.device) -> bool:
    """Make sure a process group exists (one process: a group of one, so a single-process fsdp run writes the same
    sharded checkpoints as N processes), with a backend for ``device``'s tensors; True when this call created it."""
    if dist.is_initialized():
        return False
    dist.init_process_group(BACKENDS.get(device.type, "gloo"), store=dist.HashStore(), rank=0, world_size=1)
    return True


def device_mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def mixed_precision_policy(mixed_precision: str):
    """FSDP2's policy for ``train.mixed_precision``: parameters gathered and computed in bf16/fp16, gradients
    reduced in float32; ``no``: everything float32 (the equality tests)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The FSDP units of a network: the elements of its outermost ``nn.ModuleList``s (a UNet's down/up blocks, a
    transformer's blocks, an MLP's hidden layers); the rest (embeddings, mid block, heads) joins the root unit."""
    units: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                units.extend(c for c in child if any(True for _ in c.parameters()))
            else:
                walk(child)

    walk(net)
    return units


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def broadcast_from_main(net: nn.Module) -> None:
    """Every process takes the main process's parameters and buffers, as DDP does when it wraps a network.
    ``fully_shard`` keeps each process's own slice of what it holds, so anything initialised at random (LoRA's A
    matrices, a fresh discriminator) would otherwise be stitched together from different draws."""
    if dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            dist.broadcast(t.data, src=0)


def shard(net: nn.Module, mesh, policy) -> nn.Module:
    """``fully_shard`` each block of ``net``, then ``net`` itself (in place; the same object comes back), after
    every process took the main process's weights."""
    from torch.distributed.fsdp import fully_shard

    broadcast_from_main(net)

    for unit in shard_units(net):
        if is_sharded(unit):  # already a unit of a trained network that sits on this one (LoRA fake score)
            continue
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    return net


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip sharded gradients to ``max_norm`` by their global norm (every shard of every parameter); the norm."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale.to(g.dtype))
    return norm


def meta_twin(net: nn.Module) -> nn.Module:
    """A copy of ``net``'s structure whose parameters live on the meta device (no memory), its buffers real: the
    module the main process fills with gathered weights to sample and export."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in net.parameters()}
    return copy.deepcopy(net, memo)


def repoint_optimizers(optimizers: dict[str, torch.optim.Optimizer], before: dict[int, str],
                       after: dict[str, nn.Parameter]) -> None:
    """Optimizers were built over the unsharded parameters; ``fully_shard`` replaced them. ``before``: id of an old
    parameter -> its qualified name; ``after``: name -> the sharded parameter."""
    for phase, opt in optimizers.items():
        if any(opt.state.values()):
            raise FewstepError(f"the {phase} optimizer has state before sharding; fsdp must shard before any step")
        for group in opt.param_groups:
            try:
                group["params"] = [after[before[id(p)]] for p in group["params"]]
            except KeyError:
                raise FewstepError(f"the {phase} optimizer holds a parameter of no trained network; "
                                   "train.parallel=fsdp shards only the trained networks") from None


class Sharded:
    """The run's sharded networks and what it takes to see them whole.

    ``roots``: every network ``add`` sharded (trained networks, the loss's student copies, a sharded teacher);
    ``twins``: name -> the meta twin ``add`` built before sharding, for ``whole``."""

    def __init__(self, mesh, policy) -> None:
        self.mesh, self.policy = mesh, policy
        self.twins: dict[str, nn.Module] = {}
        self.roots: list[nn.Module] = []

    def add(self, net: nn.Module, name: str | None = None) -> nn.Module:
        """Shard ``net``; ``name`` keeps a meta twin for ``whole(name)``."""
        if is_sharded(net):  # the teacher under a LoRA fake score: sharded as that trained network already
            return net
        if name is not None:
            self.twins[name] = meta_twin(net)
        self.roots.append(shard(net, self.mesh, self.policy))
        return net

    def reshard(self) -> None:
        """Put every network's sharded parameters back in place. FSDP2 keeps a root unit gathered after a forward
        that has no backward (a fake score or an EMA target run under no_grad); until its next backward, the module
        would show plain gathered tensors where the optimizer, the EMA and the checkpoint hold the DTensors."""
        for net in self.roots:
            net.reshard()

    @contextlib.contextmanager
    def whole(self, name: str, net: nn.Module, device: torch.device, main: bool) -> Iterator[nn.Module | None]:
        """Every process gathers ``net``'s full state (collective); the main process gets it in the twin, on
        ``device``, for the block (others get None). The twin's weights are dropped after."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not main:
            yield None
            return
        twin = self.twins[name]
        twin.load_state_dict({k: v.to(device) for k, v in full.items()}, strict=False, assign=True)
        del full
        try:
            yield twin
        finally:
            twin.load_state_dict({n: torch.empty_like(p, device="meta") for n, p in twin.named_parameters()},
                                 strict=False, assign=True)


__all__ = ["Sharded", "broadcast_from_main", "clip_grad_norm_", "device_mesh", "is_sharded", "meta_twin",
           "mixed_precision_policy", "process_group", "repoint_optimizers", "shard", "shard_units"]
