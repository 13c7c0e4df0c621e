"""CLIP score and DINOv2 features on tiny random transformers models saved to disk."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
                          Dinov2Config, Dinov2Model)

from fewstep.errors import FewstepError
from fewstep.eval.hf_features import clip_scores, dinov2_extractor, load_clip, load_dinov2
from fewstep.testing.tokenizer import write_clip_tokenizer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "tok"), model_max_length=77)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(root / "clip")
    return root / "clip"


def test_clip_score_equals_a_hand_computed_cosine(tiny_clip):
    model, processor = load_clip(str(tiny_clip))
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a red fox", "the owl", "a photo of the sea"]
    ours = clip_scores(model, processor, images, prompts)
    # by hand: uint8 PIL images through the processor, projected features, cosine, x100, clamp at 0
    pil = [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)) for im in images]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    ids = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        fi = model.get_image_features(pixel_values=pixels)
        ft = model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    fi = (fi if isinstance(fi, torch.Tensor) else fi.pooler_output).double().numpy()
    ft = (ft if isinstance(ft, torch.Tensor) else ft.pooler_output).double().numpy()
    cos = (fi * ft).sum(1) / np.linalg.norm(fi, axis=1) / np.linalg.norm(ft, axis=1)
    np.testing.assert_allclose(ours.numpy(), 100 * np.maximum(cos, 0), rtol=1e-6, atol=1e-9)
    with pytest.raises(FewstepError, match="one prompt per image"):
        clip_scores(model, processor, images, prompts[:2])


def test_dinov2_features_are_the_cls_output(tmp_path):
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     image_size=28, patch_size=14)).eval()
    model.save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_convert_rgb=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path / "dino")
    m, p = load_dinov2(str(tmp_path / "dino"))
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    feats = dinov2_extractor(m, p)(images)
    pixels = p(images=[Image.fromarray(a) for a in np.repeat(((images[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)[..., None], 3, -1)],
               return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = m(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(feats, cls.double())
    with pytest.raises(FewstepError, match="cannot load DINOv2 model"):
        load_dinov2(str(tmp_path / "nothing"))
