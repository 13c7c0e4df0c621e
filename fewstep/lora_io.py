"""LoRA files in diffusers' format: save a pipeline student's adapters, load them onto the base
pipeline, merge adapters into plain networks, and fuse a LoRA into a full pipeline directory.

A LoRA ``final/`` holds ``pytorch_lora_weights.safetensors`` (written by the pipeline class's own
``save_lora_weights``, with the peft config as adapter metadata so rank and alpha load back), the
scheduler to use in ``scheduler/``, ``fewstep.json`` naming the base pipeline, and a model card.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from torch import nn

from .errors import FewstepError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: the keyword each pipeline family's ``save_lora_weights`` takes for its denoiser's adapters
DENOISER_KEY = {"sd": "unet", "sdxl": "unet", "sd3": "transformer"}


def has_lora(net: nn.Module) -> bool:
    """Whether ``net`` carries peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in net.modules())


def save_pipeline_lora(pipeline, net: nn.Module, directory: Path, adapter_name: str = "default") -> Path:
    """Write ``net``'s adapter ``adapter_name`` as ``directory/pytorch_lora_weights.safetensors``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    key = DENOISER_KEY[pipeline.family]
    state = get_peft_model_state_dict(net, adapter_name=adapter_name)
    state = convert_state_dict_to_diffusers({k: v.detach().float().contiguous().cpu() for k, v in state.items()})
    metadata = net.peft_config[adapter_name].to_dict()
    type(pipeline.pipe).save_lora_weights(directory, **{f"{key}_lora_layers": state,
                                                        f"{key}_lora_adapter_metadata": metadata},
                                          weight_name=LORA_WEIGHTS, safe_serialization=True)
    return directory / LORA_WEIGHTS


class _Collect(logging.Handler):
    """Keeps the messages of warnings (diffusers reports unloaded LoRA keys as warnings on its logger)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_lora(pipe, path: str | Path) -> None:
    """``pipe.load_lora_weights(path)``, refusing any key diffusers leaves unloaded (one clear line)."""
    from diffusers.utils import logging as dlog

    handler = _Collect()
    loggers = [dlog.get_logger("diffusers"), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        path = Path(path)
        pipe.load_lora_weights(str(path.parent if path.is_file() else path),
                               weight_name=path.name if path.is_file() else LORA_WEIGHTS)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    bad = [m for m in handler.messages if "not" in m.lower() and ("key" in m.lower() or "load" in m.lower())]
    if bad:
        raise FewstepError(f"LoRA {path} did not load cleanly: {bad[0].strip().splitlines()[0]}")


def merged_network(net: nn.Module) -> nn.Module:
    """A plain copy of ``net`` (same class, no peft layers) with every LoRA adapter merged into its weights."""
    from peft.tuners.lora import LoraLayer

    work = copy.deepcopy(net)
    for m in work.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    state = {}
    for k, v in work.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    plain = type(net).from_config(net.config) if hasattr(type(net), "from_config") else type(net)(**net.config)
    plain.load_state_dict(state, strict=True)
    dtype = next(net.parameters()).dtype
    return plain if next(plain.parameters()).dtype == dtype else plain.to(dtype)


def fuse_into(pipe) -> None:
    """Bake the loaded LoRA adapters of ``pipe`` into its weights and drop the adapters."""
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def lora_chain(meta: dict[str, Any], directory: Path) -> list[Path]:
    """The LoRA files to apply, in order: the base's own (fused) ones, then this directory's."""
    return [Path(p) for p in meta.get("base_loras", [])] + [directory / LORA_WEIGHTS]


def check_lora_dir(directory: Path) -> None:
    if not (directory / LORA_WEIGHTS).is_file():
        raise FewstepError(f"{directory} has no {LORA_WEIGHTS}; pass the final/ directory of a LoRA run")


__all__ = ["LORA_WEIGHTS", "check_lora_dir", "fuse_into", "has_lora", "load_lora", "lora_chain", "merged_network",
           "save_pipeline_lora"]
