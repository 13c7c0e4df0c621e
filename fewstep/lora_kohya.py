"""A UNet LoRA in kohya's layout (sd-scripts), the one ComfyUI and AUTOMATIC1111 read: per adapted layer
``lora_unet_<module>.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and ``.alpha`` (its
scale is alpha / rank, as peft's). ``<module>`` is the layer's path with dots as underscores: in diffusers' naming
for SD 1.x, whose sd-scripts UNet mirrors diffusers', and in the original UNet's (``input_blocks``,
``middle_block``, ``output_blocks``: fewstep.single_file.unet_key) for SDXL, whose sd-scripts UNet is the
original one. diffusers' ``load_lora_weights`` reads both (tests/test_lora_kohya.py)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import FewstepError

KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
FAMILIES = ("sd", "sdxl")


def kohya_state(net: nn.Module, family: str, adapter_name: str = "default") -> dict[str, Tensor]:
    """``net``'s (a UNet with peft adapters) adapter ``adapter_name`` in kohya's keys."""
    from peft.utils import get_peft_model_state_dict

    from .single_file import unet_key

    if family not in FAMILIES:
        raise FewstepError(f"a kohya LoRA is written for {', '.join(FAMILIES)}; this is {family}")
    config = net.peft_config[adapter_name]
    out: dict[str, Tensor] = {}
    for key, value in get_peft_model_state_dict(net, adapter_name=adapter_name).items():
        module, which = key.rsplit(".lora_", 1)  # "<module>.lora_A.weight"
        path = module if family == "sd" else unet_key(module + ".weight", net.config)[: -len(".weight")]
        name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.{'lora_down' if which.startswith('A') else 'lora_up'}.weight"] = value.detach().float()
        alpha = (config.alpha_pattern or {}).get(module, config.lora_alpha)
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya_lora(net: nn.Module, family: str, path: str | Path) -> Path:
    """Write ``kohya_state(net, family)`` to ``path`` (safetensors, atomically)."""
    from .io import save_safetensors_atomic

    return save_safetensors_atomic(kohya_state(net, family), Path(path), metadata={"ss_network_module": "networks.lora"})
