"""Built-in data and metrics."""

import pytest
import torch

from softmix.data import digits, gmm, image_folder, load_data
from softmix.metrics import mixture_metrics, mmd


def test_gmm_grid_and_ring():
    grid = gmm("grid")
    assert grid.num_modes == 49 and grid.means.min() == -1 and grid.means.max() == 1
    ring = gmm("ring", modes=8)
    torch.testing.assert_close(ring.means.norm(dim=1), torch.ones(8))
    x = grid.sample(4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2)
    m = mixture_metrics(x, grid, grid.sample(1000, torch.Generator().manual_seed(1)))
    assert m["high_quality"] > 0.98 and m["modes_covered"] == 49  # true samples: ~99.7% within 3 std
    bad = mixture_metrics(torch.zeros(1000, 2) + 0.5 * grid.means[0], grid)
    assert bad["high_quality"] == 0 and bad["modes_covered"] == 0
    with pytest.raises(ValueError, match="square"):
        gmm("grid", modes=10)


def test_mmd_tells_distributions_apart():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    assert mmd(a, a) == pytest.approx(0, abs=1e-9)
    assert mmd(a, b) < 0.02 < mmd(a, b + 1.0)


def test_digits_and_image_folder(tmp_path):
    d = digits()
    assert d.shape == (1797, 1, 8, 8) and d.min() == -1 and d.max() == 1
    from PIL import Image

    Image.new("RGB", (10, 12), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (5, 5), 0).save(tmp_path / "sub" / "b.jpg")
    imgs = image_folder(tmp_path, size=4, channels=3)
    assert imgs.shape == (2, 3, 4, 4)
    torch.testing.assert_close(imgs[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(imgs[1], -torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="unknown data"):
        load_data("mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_folder(tmp_path / "empty")
