"""CLIP score and DINOv2 features through transformers, from a local directory or a hub id.

- CLIP score (Hessel et al. 2021): 100 * max(cos(E_image, E_text), 0) per image-prompt pair,
  with a named CLIP model; images go through that model's own processor.
- FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"): the
  Fréchet distance of DINOv2 ViT-L/14 CLS features (the model's pooled output) instead of
  Inception pool3.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor

from ..errors import FewstepError
from .preprocess import to_uint8


def _pil(images: Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]


def _load(loader, name: str, what: str):
    import os

    try:
        return loader(name)
    except OSError:
        offline = " (HF_HUB_OFFLINE=1: pass a local directory)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise FewstepError(f"cannot load {what} {name!r}{offline}") from None


def load_clip(name: str):
    """(CLIPModel, processor) from a directory or hub id."""
    from transformers import AutoProcessor, CLIPModel

    return _load(CLIPModel.from_pretrained, name, "CLIP model").eval(), _load(AutoProcessor.from_pretrained, name, "CLIP processor")


def _features(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


@torch.no_grad()
def clip_scores(model, processor, images: Tensor, prompts: list[str]) -> Tensor:
    """Per-pair CLIP scores (N,) for images in [-1, 1] (N, C, H, W) and N prompts."""
    if len(prompts) != len(images):
        raise FewstepError(f"CLIP score needs one prompt per image, got {len(prompts)} prompts for {len(images)} images")
    device = next(model.parameters()).device
    pixels = processor(images=_pil(images), return_tensors="pt")["pixel_values"].to(device)
    text = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
    img = _features(model.get_image_features(pixel_values=pixels)).double()
    txt = _features(model.get_text_features(input_ids=text["input_ids"].to(device),
                                            attention_mask=text["attention_mask"].to(device))).double()
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return 100 * cos.clamp_min(0).cpu()


def load_dinov2(name: str):
    """(Dinov2Model, image processor) from a directory or hub id (facebook/dinov2-large for FD_DINOv2)."""
    from transformers import AutoImageProcessor, AutoModel

    return _load(AutoModel.from_pretrained, name, "DINOv2 model").eval(), _load(AutoImageProcessor.from_pretrained, name, "DINOv2 processor")


def dinov2_extractor(model, processor) -> Callable[[Tensor], Tensor]:
    """images in [-1, 1] -> CLS features (N, hidden) in float64."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def extract(images: Tensor) -> Tensor:
        pixels = processor(images=_pil(images), return_tensors="pt")["pixel_values"].to(device)
        return model(pixel_values=pixels).pooler_output.double().cpu()

    return extract
