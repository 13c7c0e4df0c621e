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
DENOISER_KEY = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def has_lora(net: nn.Module) -> bool:
    """Whether ``net`` carries peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in net.modules())


def save_pipeline_lora(pipeline, net: nn.Module, directory: Path, adapter_name: str = "default") -> Path:
    """Write ``net``'s adapter ``adapter_name`` as ``directory/pytorch_lora_weights.safetensors``."""
    from peft.utils import get_peft_model_state_dict

    key = DENOISER_KEY[pipeline.family]
    # peft's key names, as diffusers' own LoRA scripts save them (train_lcm_distill_lora_sd_wds.py):
    # convert_state_dict_to_diffusers renames only the attention layers (to_q.lora.down), and a file that mixes
    # both namings loads in diffusers without its attention adapters (48 of 108 targets lost, silently)
    state = {k: v.detach().float().contiguous().cpu()
             for k, v in get_peft_model_state_dict(net, adapter_name=adapter_name).items()}
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

    import warnings

    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    handler = _Collect()
    loggers = [dlog.get_logger("diffusers"), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(handler)
    path = Path(path)
    file = path if path.is_file() else path / LORA_WEIGHTS
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    before = set(getattr(denoiser, "peft_config", {}) or {})
    try:
        with warnings.catch_warnings(record=True) as caught:  # peft reports targets it left out as a warning
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    messages = handler.messages + [str(w.message) for w in caught]
    bad = [m for m in messages if ("not" in m.lower() and ("key" in m.lower() or "load" in m.lower()))
           or "inconsistency" in m.lower()]
    if bad:
        raise FewstepError(f"LoRA {path} did not load cleanly: {bad[0].strip().splitlines()[0][:300]}")
    prefix = "unet." if denoiser is getattr(pipe, "unet", None) else "transformer."
    with safe_open(str(file), "pt") as f:
        expected = sum(1 for k in f.keys() if k.startswith(prefix))
    added = [a for a in (getattr(denoiser, "peft_config", {}) or {}) if a not in before]
    loaded = sum(len(get_peft_model_state_dict(denoiser, adapter_name=a)) for a in added)
    if loaded != expected:
        raise FewstepError(f"LoRA {path} did not load cleanly: {loaded} of its {expected} {prefix[:-1]} tensors reached "
                           "the network")


def merged_network(net: nn.Module) -> nn.Module:
    """A plain copy of ``net`` (same class, no peft layers) with every LoRA adapter merged into its weights."""
    from peft.tuners.lora import LoraLayer

    # at the adapters' precision: a base stored in a half dtype (lora.base_dtype) is widened first, so the merge does
    # not round the adapters' update to it, and the export keeps the precision training ran the adapters in
    dtype = next((p.dtype for n, p in net.named_parameters() if "lora_" in n), next(net.parameters()).dtype)
    work = copy.deepcopy(net).to(dtype)
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
