"""A categorical identifier: an SMD mixture whose weights follow ``x_t`` (issue 4).

SMD's default identifier maps Gaussian noise ``eta`` to the latent ``z``, so the mixture's
weights are fixed by the prior of ``eta``: as ``x_t`` moves, the components must slide from one
mode to the next and leave mass between them. ``CategoricalIdentifier`` makes ``z`` one of ``K``
learned codes, picked with probabilities ``pi(x_t, t) = softmax(logits(x_t, t))``::

    k = argmax_k (logits_k(x_t, t) + g_k),   g_k = -log(-log Phi(eta_k)),   z = codes[k]

``g_k`` is standard Gumbel noise made from ``eta ~ N(0, I_K)`` (``Phi`` the normal CDF), so
``k ~ Cat(pi)`` (the Gumbel-max trick) and the identifier is, as any SMD identifier, a
deterministic map of ``(eta, x_t, t)``: ``softmix.sample`` runs it unchanged. Training
enumerates the ``K`` components and takes the exact likelihood of the finite mixture
(``softmix.training_loss``; ``SMD.forward(..., components=True)``): by default that of the
clean sample ``x0`` (``bound="clean"``), with each component's ``x0`` estimate the centre of a
narrow Gaussian, which works with ``prediction_type="sample"``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from softmix.head import _CONV, timestep_embedding
from softmix.nets import FourierFeatures

_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}

__all__ = ["CategoricalIdentifier", "DEFAULT_NUM_COMPONENTS", "LONG_CHAIN_FOURIER", "DEFAULT_FOURIER_SCALE",
           "POSITION_GRID"]

# K: the components act as the data's modes, so K must reach about their number (7x7 grid at
# T = 4, benchmarks/results/quality.md: K = 32 / 64 / 128 put 42% / 95% / 98% of the samples on
# the modes, all 49 modes in 0 / 1 / 3 of 3 seeds) at a cost linear in K (1.6x from 64 to 128)
DEFAULT_NUM_COMPONENTS = 128

# Vectors, long chains: the logits may see random Fourier features of x_t (``fourier``). From an
# MLP on x_t alone the weights stay nearly flat in x_t where a long chain needs them sharpest,
# at its last steps (7x7 grid, T = 1000: 7% of the weight on the right mode at t = 0; with 64
# features, 94%; 38 vs 49 modes). With 50 steps or fewer the features measure level or worse
# (T = 50: 94% vs 98% on the modes), so they stay off by default (benchmarks/results/quality.md).
# x_t and the features share one Linear: a Linear of their own (x_t's weights started as without
# features) measured better at 10 to 50 steps but worse at 4 and at 1000 (MMD), where it is used.
LONG_CHAIN_FOURIER = 64
DEFAULT_FOURIER_SCALE = 2.0

# Images: the logits see the features on a coarse grid of positions (``grid``), by default,
# rather than their average over positions, which keeps which strokes an image has but not where:
# a net of this identifier's shape trained to tell the digit class from x_t (8x8 digits, T = 10)
# reaches 44% at t = 2 with the average against the exact posterior's 75%, and 70% with the
# positions kept. With the "clean" bound, the grid lowered the digits' FD from 27.9 to 13.4 at
# 4 steps (3 seeds; the plain model: 97.2), from 16.6 (seed 0) to 6.6 at 10 steps (4 seeds, 6000
# training steps; plain 18.4) and from 37.6 (seed 0) to 9.9 at 50 steps (2 seeds; plain 13.9), for 262k more
# parameters at the default width (benchmarks/results/quality.md, "Weights that see positions").
# 4 x 4 is what was measured: the 8x8 digits' own grid after the stride-2 convolution.
POSITION_GRID = 4


class CategoricalIdentifier(nn.Module):
    """``z = codes[k]``, ``k ~ Cat(softmax(logits(x_t, t)))`` drawn from ``eta`` by Gumbel-max.

    ``x_t (B, F)`` or ``(B, C, *S)``, ``eta (M * B, K)``, ``t (B,)`` -> ``z (M * B, latent_dim)``
    (one latent per example, broadcast over positions by the head).

    Args:
        in_channels: features of vector ``x_t``, channels of image ``x_t``.
        latent_dim: ``D``, size of each code.
        num_components: ``K``, the number of mixture components (codes).
        hidden: width of the network that computes the logits.
        spatial_dims: ``0`` for vectors (an MLP); ``1``, ``2`` or ``3`` for images (two 3x3
            convolutions, averaged over positions unless ``grid``).
        time_dim: size of the sinusoidal time embedding.
        fourier, fourier_scale: vectors only: the MLP sees ``FourierFeatures(in_channels,
            fourier, fourier_scale)`` of ``x_t`` (0: ``x_t`` itself). For chains of hundreds
            of steps; ``LONG_CHAIN_FOURIER`` (64) is what was measured. The scale suits data of
            about unit size, as the built-in ``MLPDenoiser``'s.
        grid: images only: ``G > 0``: the convolutions' features are pooled to a ``G`` per
            spatial dimension grid (``G x G`` for 2-D) and flattened through one Linear, so
            that the weights see where the strokes are; 0: averaged over positions.
            ``POSITION_GRID`` (4), ``SMD``'s default for images, is what was measured. It adds
            ``hidden^2 G^spatial_dims`` parameters (262k for 2-D at the default width 128 and
            G = 4) whatever the image size.
    """

    supports_fanout = True  # eta may hold M samples per example of x_t: (M * B, K)

    def __init__(
        self,
        in_channels: int,
        latent_dim: int,
        num_components: int = DEFAULT_NUM_COMPONENTS,
        hidden: int = 128,
        spatial_dims: int = 0,
        time_dim: int = 32,
        fourier: int = 0,
        fourier_scale: float = DEFAULT_FOURIER_SCALE,
        grid: int = 0,
    ):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if spatial_dims not in (0, *_CONV):
            raise ValueError(f"spatial_dims must be 0 (vectors) or 1..3 (images), got {spatial_dims}")
        if fourier < 0 or (fourier and spatial_dims):
            raise ValueError(f"fourier must be >= 0, and 0 for images (spatial_dims {spatial_dims}), got {fourier}")
        if fourier and not (math.isfinite(fourier_scale) and fourier_scale > 0):
            raise ValueError(f"fourier_scale must be a positive finite number, got {fourier_scale}")
        if grid < 0 or (grid and not spatial_dims):
            raise ValueError(f"grid must be >= 0, and 0 for vectors (spatial_dims 0), got {grid}")
        self.num_components, self.time_dim, self.spatial_dims, self.grid = num_components, time_dim, spatial_dims, grid
        # a W of its own (seed 1), not the backbone's MLPDenoiser W (seed 0)
        self.fourier_features = FourierFeatures(in_channels, fourier, fourier_scale, seed=1) if fourier else None
        if spatial_dims == 0:
            self.features = nn.Linear(in_channels + 2 * fourier, hidden)
        else:
            conv = _CONV[spatial_dims]
            self.features = nn.Sequential(conv(in_channels, hidden, 3, padding=1), nn.SiLU(),
                                          conv(hidden, hidden, 3, padding=1, stride=2))
        self.time = nn.Linear(time_dim, hidden)
        self.logits_net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, num_components))
        self.codes = nn.Embedding(num_components, latent_dim)
        if grid:  # made last, so the other layers start as without it
            self.pool = _POOL[spatial_dims](grid)
            self.positions = nn.Linear(hidden * grid**spatial_dims, hidden)

    def noise_shape(self, x_t: torch.Tensor) -> tuple[int, int]:
        """Shape of ``eta`` for a batch ``x_t``: ``(B, K)``, one Gumbel variate per component."""
        return (x_t.shape[0], self.num_components)

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-weights ``(B, K)`` of the components at ``(x_t, t)``."""
        if self.spatial_dims and self.grid:
            h = self.positions(self.pool(self.features(x_t)).flatten(1))  # (B, hidden * G^d) -> (B, hidden)
        elif self.spatial_dims:
            h = self.features(x_t).flatten(2).mean(-1)  # (B, hidden): the weights are one per example
        else:
            x = x_t.flatten(1)
            h = self.features(x if self.fourier_features is None else self.fourier_features(x))
        return self.logits_net(h + self.time(timestep_embedding(t, self.time_dim).to(h.dtype)))

    def log_weights(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log pi_k(x_t, t)``: ``(B, K)``, normalised over ``k``."""
        return torch.log_softmax(self.logits(x_t, t).float(), dim=-1)

    def component_latents(self) -> torch.Tensor:
        """The ``K`` codes ``(K, D)``: the latent of each component."""
        return self.codes.weight

    def choose(self, eta: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The component index ``k (M * B,)`` that ``eta (M * B, K)`` picks at ``(x_t, t)``."""
        b = x_t.shape[0]
        if eta.dim() != 2 or eta.shape[1] != self.num_components or eta.shape[0] % b:
            raise ValueError(
                f"CategoricalIdentifier: eta must be (M * B, K) = (M * {b}, {self.num_components}), got {tuple(eta.shape)}"
            )
        m = eta.shape[0] // b
        # float64: -log(-log Phi(eta)) keeps its tails (Phi(eta) rounds to 1 in float32 for eta > 5.4)
        gumbel = -torch.log(-torch.special.log_ndtr(eta.double()))
        return (self.logits(x_t, t).double().repeat(m, 1) + gumbel).argmax(-1)

    def forward(self, eta: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.codes(self.choose(eta, x_t, t))
