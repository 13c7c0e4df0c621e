"""Embedded data and real-data loaders against direct computations."""
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data.cache import CachedDataset, build_cache, pipeline_encoder
from fewstep.data.collate import collate
from fewstep.data.digits import DigitsDataset, load_digits_tensors
from fewstep.data.images import ImageFolder
from fewstep.data.mixtures import imbalanced_ring, make_mixture, random_mixture, reference_ring
from fewstep.data.prompts import load_prompts
from fewstep.data.tar_shards import TarShards
from fewstep.errors import FewstepError


def test_reference_ring_parameters_and_samples():
    m = reference_ring()
    k = torch.arange(8, dtype=torch.float64)
    expected = 4 * torch.stack([torch.cos(2 * math.pi * k / 8), torch.sin(2 * math.pi * k / 8)], 1)
    torch.testing.assert_close(m.means, expected)
    assert torch.allclose(m.weights, torch.full((8,), 1 / 8, dtype=torch.float64))
    x, comp = m.sample(80_000, torch.Generator().manual_seed(0), return_components=True)
    for j in range(8):
        xj = x[comp == j].double()
        assert (xj.mean(0) - m.means[j]).norm() < 0.02
        assert abs(xj.std(0).mean() - 0.3) < 0.01


def test_imbalanced_ring_and_random_mixture():
    m = imbalanced_ring()
    assert m.weights.max() / m.weights.min() >= 10
    _, comp = m.sample(200_000, torch.Generator().manual_seed(0), return_components=True)
    freq = torch.bincount(comp, minlength=8).double() / 200_000
    assert (freq - m.weights).abs().max() < 0.005
    r = random_mixture(5, 3, seed=1)
    assert (torch.linalg.eigvalsh(r.covs) > 0).all() and r.dim == 5
    with pytest.raises(FewstepError, match="valid: imbalanced_ring, random, ring"):
        make_mixture("moons")


def test_digits_are_sklearn_digits_in_minus_one_one():
    from sklearn.datasets import load_digits

    x, y = load_digits_tensors()
    d = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1
    np.testing.assert_allclose(x[:, 0].numpy(), d.images / 8 - 1, atol=1e-6)
    assert torch.equal(y, torch.tensor(d.target))
    ds = DigitsDataset(resolution=16, classes=[0, 1, 2, 3, 4])
    assert ds[0]["x0"].shape == (1, 16, 16) and set(ds.labels.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(FewstepError, match="valid: 0..9"):
        DigitsDataset(classes=[11])


def test_prompt_files(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n\n# a comment\n  a dog  \n")
    assert load_prompts(p) == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(FewstepError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(FewstepError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def _make_folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "a.txt").write_text("a red fox\n")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(root / "b.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "a grey owl", "label": 3}) + "\n")
    return root


def test_image_folder_matches_direct_pil(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    ds = ImageFolder(root, resolution=32)
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert a["prompt"] == "a red fox" and b["prompt"] == "a grey owl" and b["class_labels"] == 3
    # direct computation: short side to 32 with bicubic (60x40 -> 48x32), center crop, scale to [-1, 1]
    img = Image.open(root / "a.png").convert("RGB").resize((48, 32), Image.BICUBIC).crop((8, 0, 40, 32))
    expected = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(a["x0"], expected)
    assert b["x0"].shape == (3, 32, 32)
    batch = collate([a, b])
    assert batch["x0"].shape == (2, 3, 32, 32) and batch["prompt"] == ["a red fox", "a grey owl"]


def test_image_folder_rejects_bad_input(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    with pytest.raises(FewstepError, match="size 60x40 but 32x32 is required"):
        ImageFolder(root, resolution=32, resize=False)
    Image.new("CMYK", (32, 32)).save(root / "c.jpg")
    with pytest.raises(FewstepError, match="unsupported image mode CMYK"):
        ImageFolder(root, resolution=32)
    (root / "c.jpg").unlink()
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(FewstepError, match="notes.pdf is not an image"):
        ImageFolder(root, resolution=32)
    (root / "notes.pdf").unlink()
    (root / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FewstepError, match="cannot be read as an image"):
        ImageFolder(root, resolution=32)
    with pytest.raises(FewstepError, match="does not exist"):
        ImageFolder(tmp_path / "nothing", resolution=32)


def test_tar_shards_equal_image_folder(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("s0.png", (root / "a.png").read_bytes()), ("s0.txt", b"a red fox"),
                           ("s1.png", (root / "b.png").read_bytes()), ("s1.json", json.dumps({"text": "a grey owl", "label": 3}).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = list(TarShards(str(tmp_path / "shard-*.tar"), resolution=32))
    folder = ImageFolder(root, resolution=32)
    assert len(items) == 2
    for got, want in zip(items, [folder[0], folder[1]]):
        assert got.keys() == want.keys()
        torch.testing.assert_close(got["x0"], want["x0"])
        assert got["prompt"] == want["prompt"]
    with pytest.raises(FewstepError, match="no tar shards match"):
        TarShards(str(tmp_path / "none-*.tar"), resolution=32)


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    from fewstep.data.hf import HFImageDataset

    root = _make_folder(tmp_path / "imgs")
    imgs = [Image.open(root / "a.png").convert("RGB"), Image.open(root / "b.png").convert("RGB")]
    ds = datasets.Dataset.from_dict({"image": imgs, "text": ["a red fox", "a grey owl"]}, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    hf = HFImageDataset(str(tmp_path / "hf"), resolution=32)
    folder = ImageFolder(root, resolution=32)
    torch.testing.assert_close(hf[0]["x0"], folder[0]["x0"])
    assert hf[1]["prompt"] == "a grey owl"
    with pytest.raises(FewstepError, match="no column 'caption'; valid: image, text"):
        HFImageDataset(str(tmp_path / "hf"), resolution=32, caption_column="caption")


def test_cache_resumes_after_interruption(tmp_path):
    ds = DigitsDataset()
    sub = torch.utils.data.Subset(ds, range(50))
    calls = {"n": 0}

    def encode(batch):
        calls["n"] += 1
        return {"x0": batch["x0"] * 2, "class_labels": batch["class_labels"]}

    def failing(batch):
        if calls["n"] >= 2:
            raise RuntimeError("killed")
        return encode(batch)

    with pytest.raises(RuntimeError):
        build_cache(sub, failing, tmp_path / "c", shard_size=16, batch_size=16, progress=False)
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    build_cache(sub, encode, tmp_path / "c", shard_size=16, batch_size=16, progress=False)
    assert calls["n"] == 4  # two shards before the kill, two after: nothing recomputed
    build_cache(sub, encode, tmp_path / "full", shard_size=16, batch_size=16, progress=False)
    resumed, full = CachedDataset(tmp_path / "c"), CachedDataset(tmp_path / "full")
    assert len(resumed) == 50
    for i in range(50):
        assert torch.equal(resumed[i]["x0"], full[i]["x0"]) and torch.equal(resumed[i]["x0"], ds[i]["x0"] * 2)
        assert int(resumed[i]["class_labels"]) == int(ds[i]["class_labels"])


def test_cache_of_a_real_pipeline(tiny_dirs, tmp_path):
    from fewstep.pipelines import load_pipeline

    root = _make_folder(tmp_path / "imgs")
    lp = load_pipeline(str(tiny_dirs["sd"]))
    folder = ImageFolder(root, resolution=32)
    cache = CachedDataset(build_cache(folder, pipeline_encoder(lp), tmp_path / "cache", progress=False))
    assert sorted(cache.keys) == ["encoder_hidden_states", "x0"]
    torch.testing.assert_close(cache[1]["x0"], lp.encode_images(folder[1]["x0"][None])[0])
    torch.testing.assert_close(cache[0]["encoder_hidden_states"], lp.encode_prompts(["a red fox"])["encoder_hidden_states"][0])
