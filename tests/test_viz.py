"""Sample grids (fewstep.viz): the PNG holds the images' own pixels, tiled with a one-pixel gap."""
import numpy as np
import torch
from PIL import Image

from fewstep.viz import save_samples


def test_grid_png_holds_each_image_mapped_to_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 6, 7, generator=g) * 2 - 1
    path = save_samples(images, tmp_path / "nested" / "grid.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (4 * (2 * 7 + 1), 4 * (3 * 8 + 1), 3)  # 2 rows, 3 columns of 6x7 tiles, 1-pixel gaps, x4
    cols = 3  # ceil(sqrt(5))
    small = grid[::4, ::4]  # scale 4 for tiles of <= 16 pixels
    for i in range(5):
        r, q = divmod(i, cols)
        tile = small[1 + r * 7: 1 + r * 7 + 6, 1 + q * 8: 1 + q * 8 + 7]
        expected = ((images[i].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(tile, expected), i


def test_vectors_become_a_scatter_plot(tmp_path):
    points = torch.tensor([[0.0, 0.0], [5.9, 5.9]])
    img = np.asarray(Image.open(save_samples(points, tmp_path / "s.png")))
    assert img.shape == (512, 512, 3)
    centre = round((0 / 6 + 1) / 2 * 511)
    assert tuple(img[511 - centre, centre]) == (30, 60, 160) and tuple(img[0, 0]) == (255, 255, 255)
