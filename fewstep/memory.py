"""Training-memory estimates: weights, gradients, optimizer state and EMA of a run's networks, counted
once per tensor (a LoRA fake score shares the teacher's weights). Activations are not included; the
measured peaks of benchmarks/memory.py show what they add.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .lora import LORA_LAYERS, _matches

#: optimizer states per trainable parameter (float32 each)
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "SGD": 1, "Adagrad": 1, "RMSprop": 1}


@dataclass
class Estimate:
    trainable: int
    frozen: int
    bytes: float

    @property
    def gib(self) -> float:
        return self.bytes / 2**30


def estimate(modules: list[nn.Module | None], *, optimizer: str = "AdamW", ema_params: int = 0) -> Estimate:
    """Weights at their dtype + float32 gradients and optimizer state for trainable ones + EMA copies."""
    seen: set[int] = set()
    trainable = frozen = 0
    total = 0.0
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
    total += trainable * 4 * (1 + OPTIMIZER_STATES.get(optimizer, 2)) + ema_params * 4
    return Estimate(trainable, frozen, total)


def lora_parameter_count(net: nn.Module, rank: int, targets: list[str]) -> int:
    """Parameters LoRA of ``rank`` on ``targets`` adds: r (in + out) per Linear, r (in k k + out) per Conv."""
    count = 0
    for name, m in net.named_modules():
        if not isinstance(m, LORA_LAYERS) or not any(_matches(name, t) for t in targets):
            continue
        if isinstance(m, nn.Linear):
            count += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Embedding):
            count += rank * (m.num_embeddings + m.embedding_dim)
        else:
            k = 1
            for s in m.kernel_size:
                k *= s
            count += rank * (m.in_channels * k + m.out_channels)  # peft: A is a k x k conv, B a 1 x 1 conv
    return count


def own_bytes(net: nn.Module | None, shared_with: list[nn.Module]) -> int:
    """Bytes of ``net``'s parameters that none of ``shared_with`` holds (a teacher under a LoRA fake score shares
    its weights with that trained network): what fsdp's ``fsdp_teacher: replicate`` keeps whole on every process."""
    if net is None:
        return 0
    shared = {id(p) for m in shared_with for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in net.parameters() if id(p) not in shared)


def largest_unit_bytes(nets: list[nn.Module | None]) -> int:
    """Weights of the largest FSDP unit (fewstep.sharding.shard_units) of ``nets``: what an fsdp process gathers
    whole for one block's forward or backward."""
    from .sharding import shard_units

    sizes = [sum(p.numel() * p.element_size() for p in u.parameters()) for m in nets if m is not None
             for u in shard_units(m)]
    return max(sizes, default=0)


def per_process_bytes(total: float, replicated: float, unit: float, *, processes: int, parallel: str) -> float:
    """One process's share of a run whose networks take ``total`` bytes whole (weights, gradients, optimizer state,
    EMA). ddp: all of it on every process. fsdp: 1/N of everything sharded, the ``replicated`` bytes (a teacher kept
    whole) in full, and two units of ``unit`` bytes gathered whole (the block running and the one FSDP2 prefetches)."""
    if parallel == "ddp" or processes == 1:
        return total
    return (total - replicated) / processes + replicated + 2 * unit


__all__ = ["Estimate", "OPTIMIZER_STATES", "estimate", "largest_unit_bytes", "lora_parameter_count", "own_bytes", "per_process_bytes"]
