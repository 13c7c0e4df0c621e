"""``train.compile``: ``torch.compile`` of the networks a run calls, by region.

Regional compilation (the PyTorch recipe diffusers' ``compile_repeated_blocks`` follows) compiles each repeated
block on its own instead of the whole network: blocks of one class share their compiled code, so compile time stays
short, and what lies between them (embeddings, heads) runs eagerly. The regions are the blocks a diffusers model
names in ``_repeated_blocks`` (UNet2DConditionModel: its BasicTransformerBlocks; FLUX: its two block kinds), else
the units fewstep.sharding.shard_units gives (the elements of the outermost ModuleLists: an MLP's hidden layers),
else the whole network. ``nn.Module.compile`` compiles in place, so the same objects stay in the optimizers, the
EMA, the checkpoints and the DDP wrapper.
"""
from __future__ import annotations

from torch import nn

from .sharding import shard_units


#: graphs dynamo may keep per region's code: a UNet's blocks of one class run at several widths, resolutions and
#: memory layouts (and with and without grad in training), each its own graph. With torch's default of 8, SDXL's
#: BasicTransformerBlocks hit the limit in one call (benchmarks/gpu_rehearsal.py, CPU mode) and the rest ran eagerly.
RECOMPILE_LIMIT = 64


def compile_regions(net: nn.Module) -> int:
    """Compile ``net``'s regions in place (see the module docstring); how many were compiled. Raises dynamo's
    per-code recompile limit to RECOMPILE_LIMIT (process-wide) if it is lower."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    names = getattr(net, "_repeated_blocks", None) or ()
    regions = [m for m in net.modules() if type(m).__name__ in names] or shard_units(net) or [net]
    for m in regions:
        m.compile()
    return len(regions)


__all__ = ["compile_regions"]
