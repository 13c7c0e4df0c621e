"""LoRA files and merging (fewstep.lora_io): a merged copy computes W + (alpha / r) B A by hand, with no peft layer left."""
import torch

from fewstep.denoisers import MLPNet
from fewstep.lora import inject_lora
from fewstep.lora_io import has_lora, merged_network


def test_merged_network_is_the_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    net = MLPNet(dim=2, hidden=16, depth=2)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    targets = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][:1]
    inject_lora(net, rank=2, alpha=4.0, target_modules=targets, init="gaussian")
    with torch.no_grad():  # adapters away from their zero start
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert has_lora(net)
    plain = merged_network(net)
    assert not has_lora(plain) and type(plain) is MLPNet
    layer = net.get_submodule(targets[0])
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base[f"{targets[0]}.weight"] + (4.0 / 2) * B @ A
    assert torch.allclose(plain.state_dict()[f"{targets[0]}.weight"], expected, atol=1e-6)
    untouched = [k for k in base if not k.startswith(targets[0])]
    assert untouched and all(torch.equal(plain.state_dict()[k], base[k]) for k in untouched)
    x, t = torch.randn(5, 2), torch.full((5,), 500.0)
    with torch.no_grad():
        assert torch.allclose(plain(x, t), net(x, t), atol=1e-5)
