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


@pytest.mark.parametrize("dims,modes", [(8, 16), (32, 32)])
def test_random_mixture_in_high_dimensions(dims, modes):
    mix = gmm("random", modes=modes, dims=dims, seed=0)
    assert mix.means.shape == (modes, dims) and mix.means.abs().max() <= 1
    assert mix.std == pytest.approx(float(torch.pdist(mix.means.double()).min()) / 10)
    torch.testing.assert_close(gmm("random", modes=modes, dims=dims, seed=0).means, mix.means)  # fixed by the seed
    g = torch.Generator().manual_seed(0)
    x = mix.sample(8000, g)
    # moments: a point minus its nearest centre is N(0, std^2 I)
    offset = x - mix.means[torch.cdist(x, mix.means).argmin(1)]
    assert offset.mean().abs() < 0.05 * mix.std
    assert offset.square().mean().sqrt() == pytest.approx(mix.std, rel=0.02)
    # true samples score as true samples in D > 2 (a fixed 3-std ball would hold few of them);
    # samples sqrt(2) times too wide do not
    m = mixture_metrics(x[:2000], mix, x[2000:4000])
    assert m["high_quality"] > 0.97 and m["modes_covered"] == modes and m["mmd"] < 0.01
    shifted = mixture_metrics(x[:2000] + mix.std * torch.randn(2000, dims, generator=g), mix, x[2000:4000])
    assert shifted["high_quality"] < m["high_quality"] - 0.2 and shifted["mmd"] > 1.5 * m["mmd"]
    collapsed = mixture_metrics(mix.means[:1] + mix.std * torch.randn(2000, dims, generator=g), mix, x[2000:4000])
    assert collapsed["modes_covered"] == 1 and collapsed["mmd"] > 0.1


def test_grid_with_unequal_widths():
    mix = gmm("grid", width_ratio=4.0, seed=0)
    s = mix.stds
    assert s.shape == (49,) and not mix.equal_widths and gmm("grid").equal_widths
    assert float(s.max() / s.min()) == pytest.approx(4.0, rel=1e-5)
    assert float(s.log().mean().exp()) == pytest.approx(2 / 6 / 10, rel=1e-5)  # geometric mean: the grid's std
    g = torch.Generator().manual_seed(0)
    x = mix.sample(20000, g)
    # each component's spread is its own std (offsets from the nearest centre, widest vs narrowest)
    nearest = torch.cdist(x, mix.means).argmin(1)
    offset = x - mix.means[nearest]
    for k in (int(s.argmax()), int(s.argmin())):
        rms = offset[nearest == k].square().mean().sqrt()
        assert float(rms) == pytest.approx(float(s[k]), rel=0.1)
    # the log-density normalises each component by its own width: integrates to 1 over a fine grid
    axis = torch.linspace(-1.5, 1.5, 601)
    pts = torch.cartesian_prod(axis, axis)
    assert float(mix.log_prob(pts).double().exp().sum() * (axis[1] - axis[0]) ** 2) == pytest.approx(1.0, abs=1e-3)
    m = mixture_metrics(x[:4000], mix, x[4000:8000])
    assert m["high_quality"] > 0.97 and m["modes_covered"] == 49
    # samples at the narrow modes' own std around the wide modes' centres are inside; the reverse is not
    wide, narrow = s > s.median(), s < s.median()
    inside = mixture_metrics(mix.means[wide].repeat(40, 1) + s[narrow].mean() * torch.randn(960, 2, generator=g), mix)
    outside = mixture_metrics(mix.means[narrow].repeat(40, 1) + 2 * s[wide].mean() * torch.randn(960, 2, generator=g), mix)
    assert inside["high_quality"] > 0.95 and outside["high_quality"] < 0.6
    with pytest.raises(ValueError, match="width_ratio"):
        gmm("grid", width_ratio=0.5)
    with pytest.raises(ValueError, match="2-D"):
        gmm("grid", dims=8)


@pytest.mark.parametrize("name, dims, modes", [("gmm-widths", 2, 49), ("gmm-d8", 8, 16), ("gmm-d32", 32, 32)])
def test_harder_mixtures_load_by_name(name, dims, modes):
    # the names --data accepts: the same mixtures as the quality benchmark's experiment 3
    x, mixture = load_data(name, n=500, generator=torch.Generator().manual_seed(0))
    assert x.shape == (500, dims) and mixture.num_modes == modes
    nearest = torch.cdist(x, mixture.means).argmin(dim=1)
    # every sample lies near its mode: within the high-quality radius of the metrics
    from softmix.metrics import quality_radius

    within = (x - mixture.means[nearest]).norm(dim=1) <= quality_radius(dims) * mixture.stds[nearest]
    assert within.float().mean() > 0.95
