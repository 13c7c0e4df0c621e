"""LPIPS-VGG written in fewstep: structure, metric properties, weight conversion, clear errors.
(Its numbers against the reference implementation need the published weights, which are not available offline.)"""
import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.lpips import LPIPS, WIDTHS, convert, load_lpips


def _random_lpips(seed=0):
    torch.manual_seed(seed)
    m = LPIPS()
    for lin in m.lins:  # LPIPS' linear layers are non-negative
        lin.weight.data = lin.weight.data.abs()
    return m.eval()


def test_vgg16_layout():
    m = LPIPS()
    convs = [l for l in m.features if isinstance(l, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(p.numel() for p in m.features.parameters()) == 14_714_688  # VGG-16's convolutional part
    assert [lin.in_channels for lin in m.lins] == list(WIDTHS)


def test_metric_properties():
    m = _random_lpips()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-6)
        assert torch.allclose(m(x, y), m(y, x), atol=1e-6)
        assert (m(x, y) > 0).all()
        near = m(x, (x + 0.01 * torch.randn_like(x)).clamp(-1, 1))
        assert (near < m(x, y)).all()


def test_convert_maps_public_names_and_load_roundtrip(tmp_path):
    from safetensors.torch import save_file

    ref = LPIPS()
    vgg = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.state_dict().items() if k.startswith("features.")}
    vgg["features.30.weight"] = torch.zeros(1)  # torchvision's later layers and classifier are dropped
    vgg["classifier.0.weight"] = torch.zeros(1)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(WIDTHS)}
    state = convert(vgg, lin)
    save_file(state, tmp_path / "lpips_vgg.safetensors")
    m = load_lpips(tmp_path / "lpips_vgg.safetensors")
    assert torch.equal(m.lins[2].weight, lin["lin2.model.1.weight"])
    with pytest.raises(FewstepError, match="lpips_vgg.safetensors not found"):
        load_lpips(tmp_path / "missing" / "lpips_vgg.safetensors")
