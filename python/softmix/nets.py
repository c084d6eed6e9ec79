"""Small built-in denoisers for the command line and the tests.

``MLPDenoiser`` for vectors (the Gaussian-mixture toys), ``ConvDenoiser`` for small images
(8x8 digits, a folder of images). Both are called as ``net(x_t, t)`` and predict a tensor of
the shape of ``x_t``. Their first and last registered layers are the input and output
projections, so ``SMD``'s automatic injection points land where DESIGN.md puts them.

Setting ``net.gradient_checkpointing = True`` recomputes each residual block in the backward
pass instead of keeping its activations (``torch.utils.checkpoint``, non-reentrant): less
memory for one more forward pass of the blocks. The input and output projections, where
SMD injects by default, stay outside the checkpointed blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from softmix.head import timestep_embedding

__all__ = ["FourierFeatures", "MLPDenoiser", "ConvDenoiser", "build_backbone"]


class FourierFeatures(nn.Module):
    """``(B, F) -> (B, F + 2 n)``: ``concat(x, sin(2 pi x W), cos(2 pi x W))``, random Fourier
    features (Tancik et al. 2020) with a fixed ``W (F, n) ~ N(0, scale^2)``.

    ``W`` is drawn from ``seed``, so a rebuilt module has the same ``W`` and no state to save.
    A plain MLP is biased towards smooth functions and blurs sharp, many-moded data such as the
    7x7 toy (modes of std 0.033); the features let it resolve them.
    """

    def __init__(self, features: int, n: int, scale: float, seed: int = 0):
        super().__init__()
        self.n, self.scale = n, scale
        w = torch.randn(features, n, generator=torch.Generator().manual_seed(seed)) * scale
        self.register_buffer("w", w, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = 2 * torch.pi * (x @ self.w.to(x.dtype))
        return torch.cat([x, proj.sin(), proj.cos()], dim=-1)


class MLPDenoiser(nn.Module):
    """``(B, F), (B,) -> (B, F)``: residual MLP with a sinusoidal time embedding.

    ``fourier > 0`` first maps the input to ``FourierFeatures(features, fourier, fourier_scale)``.
    """

    gradient_checkpointing = False  # recompute each block in the backward pass (saves memory)

    def __init__(self, features: int = 2, hidden: int = 128, layers: int = 3, time_dim: int = 32,
                 fourier: int = 0, fourier_scale: float = 4.0):
        super().__init__()
        self.features, self.hidden, self.layers, self.time_dim = features, hidden, layers, time_dim
        self.fourier, self.fourier_scale = fourier, fourier_scale
        self.in_channels = features  # what SMD reads (the first Linear sees the Fourier features too)
        self.fourier_features = FourierFeatures(features, fourier, fourier_scale) if fourier else None
        # first Linear: SMD's input injection point
        self.in_proj = nn.Linear(features + 2 * fourier, hidden)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, features)  # last Linear: SMD's output injection point

    def spec(self) -> dict:
        spec = {"type": "mlp", "features": self.features, "hidden": self.hidden, "layers": self.layers, "time_dim": self.time_dim}
        if self.fourier:
            spec.update(fourier=self.fourier, fourier_scale=self.fourier_scale)
        return spec

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if self.fourier_features is not None:
            x = self.fourier_features(x)
        h = self.in_proj(x) + self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = h + checkpoint(block, h, use_reentrant=False)
            else:
                h = h + block(h)
        return self.out_proj(F.silu(self.norm(h)))


class _ResBlock(nn.Module):
    def __init__(self, channels: int, time_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.temb = nn.Linear(time_channels, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        r = self.conv1(F.silu(self.norm1(h))) + self.temb(temb)[:, :, None, None]
        r = self.conv2(F.silu(self.norm2(r)))
        return h + r


class ConvDenoiser(nn.Module):
    """``(B, C, H, W), (B,) -> (B, C, H, W)``: a small all-convolutional residual net
    (no down-sampling: meant for tiny images such as 8x8 digits)."""

    gradient_checkpointing = False  # recompute each block in the backward pass (saves memory)

    def __init__(self, channels: int = 1, hidden: int = 64, blocks: int = 3, time_dim: int = 64, groups: int = 8):
        super().__init__()
        self.channels, self.hidden, self.blocks_n, self.time_dim, self.groups = channels, hidden, blocks, time_dim, groups
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)  # first conv
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(_ResBlock(hidden, hidden, groups) for _ in range(blocks))
        self.norm_out = nn.GroupNorm(groups, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)  # last conv

    def spec(self) -> dict:
        return {"type": "conv", "channels": self.channels, "hidden": self.hidden, "blocks": self.blocks_n,
                "time_dim": self.time_dim, "groups": self.groups}

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        h = self.conv_in(x)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, temb, use_reentrant=False)
            else:
                h = block(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_backbone(config: dict) -> nn.Module:
    """Rebuild a built-in backbone from its ``spec()``."""
    config = dict(config)
    kind = config.pop("type")
    if kind == "mlp":
        return MLPDenoiser(**config)
    if kind == "conv":
        config["blocks"] = config.pop("blocks")
        return ConvDenoiser(**config)
    raise ValueError(f"unknown backbone type {kind!r}")
