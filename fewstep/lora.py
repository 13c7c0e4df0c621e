"""LoRA (Hu et al. 2021) on any trainable network through peft; the base weights stay frozen."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import FewstepError

LORA_LAYERS = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding)
#: LoRA targets across a whole diffusers UNet or transformer block (attention, feed-forward, convolutions, time
#: projection): an f-distill ``teacher_lora`` fake score's default, and the dry run's "LoRA student" estimate
WIDE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj"]


def lora_candidates(net: nn.Module) -> list[str]:
    """Leaf-name suffixes of the layers LoRA can wrap (e.g. to_q, to_out.0, proj_in)."""
    names = set()
    for name, module in net.named_modules():
        if isinstance(module, LORA_LAYERS) and name:
            parts = name.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return sorted(names)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def inject_lora(net: nn.Module, *, rank: int, alpha: float | None, target_modules: list[str], dropout: float = 0.0,
                init: str = "gaussian", adapter_name: str = "default", seed: int = 0) -> nn.Module:
    """Add LoRA adapters to ``net`` in place; only adapter weights stay trainable. The random matrices are drawn
    from ``seed`` (the global RNG is left as it was), so a run's adapters start the same on every launch and in
    every process."""
    from peft import LoraConfig

    if rank < 1:
        raise FewstepError(f"lora.rank must be at least 1, got {rank}")
    names = [n for n, m in net.named_modules() if isinstance(m, LORA_LAYERS)]
    for target in target_modules:
        if not any(_matches(n, target) for n in names):
            raise FewstepError(f"LoRA target module {target!r} matches no layer of {type(net).__name__}; "
                               f"valid: {', '.join(lora_candidates(net))}")
    init_value: bool | str = True if init == "default" else init
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules),
                        lora_dropout=dropout, init_lora_weights=init_value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(net, "add_adapter") and hasattr(net, "set_adapter"):
            net.add_adapter(config, adapter_name=adapter_name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, net, adapter_name=adapter_name)
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n)
    return net


def default_targets(net: nn.Module, wanted: list[str]) -> list[str]:
    """The names of ``wanted`` that match a layer of ``net`` (a default target list fits UNets and transformers)."""
    present = [t for t in wanted if any(_matches(n, t) for n, m in net.named_modules() if isinstance(m, LORA_LAYERS))]
    if not present:
        raise FewstepError(f"none of the LoRA targets {', '.join(wanted)} is a layer of {type(net).__name__}; "
                           f"valid: {', '.join(lora_candidates(net))}")
    return present


@contextlib.contextmanager
def adapters_off(net: nn.Module):
    """Run ``net`` as its base model: every LoRA adapter disabled (peft's switch), requires_grad untouched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    flags = {p: p.requires_grad for m in layers for p in m.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield net
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
