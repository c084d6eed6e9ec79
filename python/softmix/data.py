"""Built-in data: Gaussian mixtures (2-D grid and ring, random centres in D dimensions), scikit-learn's 8x8 digits, a folder of
images. Everything is generated or shipped with a package: nothing is downloaded.

All data are scaled to roughly ``[-1, 1]`` (what diffusion models expect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["GaussianMixture", "gmm", "digits", "image_folder", "load_data", "DATA_NAMES", "TOY_MIXTURES",
           "IMAGE_SUFFIXES"]

# The built-in toy mixtures by name (``--data``); ``gmm`` is the paper's 7x7 grid. The last
# three are issue 4's harder mixtures: unequal widths, and random centres in 8 and 32 dims.
TOY_MIXTURES = {
    "gmm": lambda: gmm("grid"),
    "gmm-ring": lambda: gmm("ring"),
    "gmm-widths": lambda: gmm("grid", width_ratio=4.0, seed=0),
    "gmm-d8": lambda: gmm("random", modes=16, dims=8, seed=0),
    "gmm-d32": lambda: gmm("random", modes=32, dims=32, seed=0),
}
DATA_NAMES = (*TOY_MIXTURES, "digits")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class GaussianMixture:
    """An equal-weight mixture of isotropic Gaussians ``N(means[k], std_k^2 I)``.

    ``means``: ``(K, F)``; ``std``: one float (every component as wide) or a ``(K,)`` tensor
    (a width per component).
    """

    means: torch.Tensor
    std: float | torch.Tensor

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def stds(self) -> torch.Tensor:
        """``(K,)``: the std of each component."""
        return torch.as_tensor(self.std, dtype=self.means.dtype).expand(self.num_modes)

    @property
    def equal_widths(self) -> bool:
        return not torch.is_tensor(self.std) or bool((self.std == self.std.reshape(-1)[0]).all())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.randint(0, self.num_modes, (n,), generator=generator)
        return self.means[k] + self.stds[k, None] * torch.randn(n, self.means.shape[1], generator=generator)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, F) -> (N,)`` log-density of the mixture."""
        f = self.means.shape[1]
        s = self.stds.double()  # (K,)
        d2 = torch.cdist(x.double(), self.means.double()).square()  # (N, K)
        log_comp = -0.5 * d2 / s.square() - f * torch.log(s * math.sqrt(2 * math.pi))
        return (torch.logsumexp(log_comp, dim=1) - math.log(self.num_modes)).float()


def gmm(kind: str = "grid", modes: int | None = None, std: float | None = None, dims: int = 2,
        width_ratio: float = 1.0, seed: int = 0) -> GaussianMixture:
    """The toy mixtures. ``grid``: a ``k x k`` grid on ``[-1, 1]^2`` (default 7x7 = 49 modes,
    the paper's toy); ``ring``: ``modes`` points on the unit circle (default 8); ``random``:
    ``modes`` centres (default 16) drawn uniformly in ``[-1, 1]^dims`` with ``seed``.
    ``std`` defaults to a tenth of the distance between neighbouring modes (for ``random``, of
    the smallest distance between two centres).

    ``width_ratio > 1`` gives the components different widths: stds log-evenly spaced from
    ``std / sqrt(width_ratio)`` to ``std * sqrt(width_ratio)`` (so the widest is
    ``width_ratio`` times the narrowest), assigned to the modes in an order shuffled with ``seed``.
    """
    if kind == "grid":
        modes = 49 if modes is None else modes
        k = int(round(math.sqrt(modes)))
        if k * k != modes or k < 2:
            raise ValueError(f"a grid mixture needs a square number of modes >= 4, got {modes}")
        axis = torch.linspace(-1, 1, k)
        means = torch.cartesian_prod(axis, axis)
        spacing = 2 / (k - 1)
    elif kind == "ring":
        modes = 8 if modes is None else modes
        if modes < 2:
            raise ValueError(f"a ring mixture needs at least 2 modes, got {modes}")
        angle = torch.arange(modes) * 2 * math.pi / modes
        means = torch.stack([angle.cos(), angle.sin()], dim=1)
        spacing = 2 * math.sin(math.pi / modes)
    elif kind == "random":
        modes = 16 if modes is None else modes
        if modes < 2 or dims < 1:
            raise ValueError(f"a random mixture needs at least 2 modes and 1 dim, got modes={modes}, dims={dims}")
        means = torch.rand(modes, dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
        spacing = float(torch.pdist(means).min())
    else:
        raise ValueError(f"unknown mixture kind {kind!r}; expected 'grid', 'ring' or 'random'")
    if kind != "random" and dims != 2:
        raise ValueError(f"the {kind!r} mixture is 2-D (use kind='random' for dims={dims})")
    if width_ratio < 1:
        raise ValueError(f"width_ratio must be >= 1 (widest std / narrowest), got {width_ratio}")
    base = spacing / 10 if std is None else float(std)
    if width_ratio == 1:
        return GaussianMixture(means.float(), base)
    log_r = math.log(width_ratio)
    stds = base * torch.exp(torch.linspace(-0.5 * log_r, 0.5 * log_r, modes, dtype=torch.float64))
    order = torch.randperm(modes, generator=torch.Generator().manual_seed(seed))
    return GaussianMixture(means.float(), stds[order].float())


def digits() -> torch.Tensor:
    """scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn), ``(N, 1, 8, 8)`` in
    ``[-1, 1]``."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float()  # values 0..16
    return (images / 8.0 - 1.0).unsqueeze(1)


def image_folder(path: str | Path, size: int = 32, channels: int = 3) -> torch.Tensor:
    """Every image under ``path`` (recursively), resized to ``size x size``: ``(N, C, size, size)``
    in ``[-1, 1]``. ``channels``: 1 (grey) or 3 (RGB)."""
    from PIL import Image

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"image folder {path} does not exist or is not a directory")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float()
        except OSError as err:
            raise ValueError(f"cannot read image {f}: {err}") from err
        out.append(t.reshape(size, size, channels).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1.0


def load_data(name: str, n: int = 10000, generator: torch.Generator | None = None, image_size: int = 32,
              channels: int = 3) -> tuple[torch.Tensor, GaussianMixture | None]:
    """``(data, mixture)`` for a built-in name or an image folder path. ``mixture`` is the
    true distribution for the toys (used by the metrics), else ``None``."""
    name = "gmm" if name == "gmm-grid" else name
    if name in TOY_MIXTURES:
        mix = TOY_MIXTURES[name]()
        return mix.sample(n, generator), mix
    if name == "digits":
        return digits(), None
    if Path(name).exists():
        return image_folder(name, size=image_size, channels=channels), None
    raise ValueError(f"unknown data {name!r}: expected one of {DATA_NAMES} or an existing image folder")
