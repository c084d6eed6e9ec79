"""The SMD head: the identifier ``g_xi`` and the hypernetwork ``f_phi`` (DESIGN.md section 2).

``z = g_xi(eta, x_t, t)`` maps latent noise ``eta ~ N(0, I)`` and the current state to a latent
map; at an injection point with features ``h`` the hypernetwork modulates them::

    r   = W_in h                          # C -> D
    v_l = A_l z + b_l,  l = 1..L          # D -> D, per position
    s_l = softplus(c_l)                   # one learned scalar per layer
    y   = latent_transform(r, v, s)       # y_l = v_l <v_l, y_{l-1}> + s_l y_{l-1}   (fused op)
    h  <- h + W_out y                     # D -> C, W_out zero at init

``W_out`` starts at zero, so a freshly wrapped model computes exactly what it computed before
(wrapping a pretrained model does not change it); the first optimiser step moves ``W_out``
and from then on the head and identifier get gradients (as LoRA's ``B = 0`` init does).

Before a last layer that is a plain Linear or Conv (``inject="output"``), the training loss's
``M`` samples per example need not pass ``W_out`` and the layer one by one: the layer is linear,
so ``W_out`` folds into its weight (``SMDHead.through_layer``), and when every example takes
the same ``K`` latents (the categorical identifier's codes) the whole modulation does, as ``K``
extra output channels of the layer (``SMDHead.through_layer_shared``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from softmix import ops

__all__ = [
    "timestep_embedding",
    "ConvIdentifier",
    "MLPIdentifier",
    "SMDHead",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ConvIdentifier(nn.Module):
    """``g_xi`` for images: a small conv net on ``concat(x_t, eta)`` plus a time embedding.

    ``x_t (B, C, *S)``, ``eta (B, C_eta, *S)``, ``t (B,)`` -> ``z (B, latent_dim, *S)``.
    Works for 1-, 2- and 3-D spatial inputs (``spatial_dims``).
    """

    def __init__(
        self,
        in_channels: int,
        latent_dim: int,
        noise_channels: int | None = None,
        hidden: int = 32,
        spatial_dims: int = 2,
        time_dim: int = 32,
    ):
        super().__init__()
        conv = _CONV[spatial_dims]
        noise_channels = in_channels if noise_channels is None else noise_channels
        self.time_dim = time_dim
        # conv1(concat(x_t, eta)) split by linearity into conv_x(x_t) + conv_eta(eta), so the
        # x_t and time parts run once per example when eta carries M samples per example
        self.conv_x = conv(in_channels, hidden, 3, padding=1)
        self.conv_eta = conv(noise_channels, hidden, 3, padding=1, bias=False)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.conv2 = conv(hidden, hidden, 1)  # 1x1: cheap when run on M * B samples
        self.out = conv(hidden, latent_dim, 1)

    supports_fanout = True  # eta may hold M samples per example of x_t: (M * B, ...)

    def forward(self, eta: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv_x(x_t)
        temb = self.time(timestep_embedding(t, self.time_dim).to(h.dtype))
        h = h + temb.reshape(*temb.shape, *([1] * (h.dim() - 2)))  # (B, hidden, *S)
        e = self.conv_eta(eta.to(x_t.dtype))  # (M * B, hidden, *S)
        m = e.shape[0] // h.shape[0]
        h = F.silu((e.reshape(m, *h.shape) + h).reshape(e.shape))
        h = F.silu(self.conv2(h))
        return self.out(h)


class MLPIdentifier(nn.Module):
    """``g_xi`` for vectors: an MLP on ``concat(x_t, eta, time embedding)``.

    ``x_t (B, F)``, ``eta (B, F_eta)``, ``t (B,)`` -> ``z (B, latent_dim)``.
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        noise_features: int | None = None,
        hidden: int = 64,
        time_dim: int = 32,
    ):
        super().__init__()
        noise_features = in_features if noise_features is None else noise_features
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(in_features + noise_features + time_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, latent_dim),
        )

    def forward(self, eta: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = eta.shape[0] // x_t.shape[0]
        if m > 1:
            x_t, t = x_t.repeat(m, *([1] * (x_t.dim() - 1))), t.repeat(m)
        temb = timestep_embedding(t, self.time_dim).to(x_t.dtype)
        return self.net(torch.cat([x_t.flatten(1), eta.to(x_t.dtype).flatten(1), temb], dim=-1))

    supports_fanout = True


class SMDHead(nn.Module):
    """The hypernetwork ``f_phi`` and the modulation at one injection point.

    Args:
        channels: ``C``, the feature channels at the injection point.
        latent_dim: ``D``, the channels of ``z`` and of the projected features.
        hyper_layers: ``L``, the number of rank-one-plus-identity maps.
        channel_dim: where ``C`` sits in ``h``: ``1`` for conv features ``(B, C, *S)``,
            ``-1`` for linear features ``(B, ..., C)``.
    """

    def __init__(self, channels: int, latent_dim: int, hyper_layers: int = 2, channel_dim: int = 1):
        super().__init__()
        if latent_dim < 1 or hyper_layers < 1:
            raise ValueError("latent_dim and hyper_layers must be positive")
        self.channels, self.latent_dim, self.hyper_layers = channels, latent_dim, hyper_layers
        self.channel_dim = channel_dim
        self.w_in = nn.Linear(channels, latent_dim, bias=False)
        self.hyper = nn.Linear(latent_dim, hyper_layers * latent_dim)  # A_l, b_l for all l
        # v_l = A_l z + b_l should be O(1 / sqrt(D)) so that v v^T r stays O(r) at init
        nn.init.normal_(self.hyper.weight, std=1.0 / latent_dim)
        nn.init.zeros_(self.hyper.bias)
        # s_l = softplus(c_l) = 1 at init
        self.c = nn.Parameter(torch.full((hyper_layers,), math.log(math.e - 1)))
        self.w_out = nn.Linear(latent_dim, channels, bias=False)
        nn.init.zeros_(self.w_out.weight)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` or ``(B, ..., C)`` -> ``(B * positions, C)`` channels-last rows."""
        if self.channel_dim == 1 and x.dim() > 2:
            x = x.movedim(1, -1)
        return x.reshape(-1, x.shape[-1])

    def _unrows(self, rows: torch.Tensor, like_shape: torch.Size) -> torch.Tensor:
        if self.channel_dim == 1 and len(like_shape) > 2:
            b, c, *s = like_shape
            return rows.reshape(b, *s, c).movedim(-1, 1)
        return rows.reshape(like_shape)

    def _fit_latent(self, z: torch.Tensor, h_shape: torch.Size, batch: int) -> torch.Tensor:
        """Bring ``z`` to the injection point's positions: ``(batch * positions, D)`` rows."""
        if self.channel_dim == 1 and len(h_shape) > 2:
            spatial = tuple(h_shape[2:])
            if z.dim() == 2:  # one latent per example, broadcast over positions
                z = z.reshape(*z.shape, *([1] * len(spatial))).expand(batch, z.shape[1], *spatial)
            elif tuple(z.shape[2:]) != spatial:
                z = F.interpolate(z, size=spatial, mode="nearest")
            return z.movedim(1, -1).reshape(-1, z.shape[1])
        # linear features (B, ..., C): one latent per example, broadcast over middle dims
        z = z.reshape(batch, -1)
        middle = int(math.prod(h_shape[1:-1])) if len(h_shape) > 2 else 1
        if middle > 1:
            z = z[:, None, :].expand(batch, middle, z.shape[-1])
        return z.reshape(-1, z.shape[-1])

    def _transformed_rows(self, h: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``y = latent_transform(W_in h, v(z), s)`` as ``(M * B * positions, D)`` rows, and ``M``."""
        b = h.shape[0]
        fan = z.shape[0] // b
        if fan * b != z.shape[0]:
            raise RuntimeError(
                f"SMD head: latent batch {z.shape[0]} is not a multiple of the feature batch {b}"
            )
        r = self.w_in(self._rows(h))  # (B * P, D)
        if fan > 1:
            r = r.repeat(fan, 1)  # (M * B * P, D), sample-major like z
        z = z.to(r.dtype)
        if z.dim() == 2:  # one latent per example: v(z) once per example, then broadcast
            v = self._fit_latent(self.hyper(z), h.shape, z.shape[0])
        else:
            v = self.hyper(self._fit_latent(z, h.shape, z.shape[0]))
        n, d = v.shape[0], self.latent_dim
        if n != r.shape[0]:
            raise RuntimeError(f"SMD head: latent rows {n} do not match feature rows {r.shape[0]}")
        v = v.reshape(n, self.hyper_layers, d).transpose(0, 1)  # (L, N, D)
        s = F.softplus(self.c).to(r.dtype)
        return ops.latent_transform(r, v, s), fan  # fused: O(L D) per position

    def modulation(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``W_out latent_transform(W_in h, v(z), s)`` for ``h`` and ``z`` of batch ``B * M``.

        When ``z`` has ``M`` times the batch of ``h`` (the Monte Carlo fan-out of
        ``softmix.training_loss``), ``W_in h`` is computed once and shared by the ``M``
        samples; the result then has batch ``M * B``, ordered sample-major (``m * B + b``).
        """
        y, fan = self._transformed_rows(h, z)
        out_shape = (fan * h.shape[0], *h.shape[1:])
        return self._unrows(self.w_out(y), torch.Size(out_shape))

    def folds_into(self, layer: nn.Module) -> bool:
        """Whether ``through_layer`` can fold ``W_out`` into ``layer`` (a plain Linear, or a
        Conv of one group, whose input the head modulates)."""
        if type(self).modulation is not SMDHead.modulation:  # a subclass changed the modulation
            return False
        if type(layer) is nn.Linear:
            return self.channel_dim == -1 and layer.in_features == self.channels
        return (type(layer) in _CONV.values() and self.channel_dim == 1 and layer.groups == 1
                and layer.in_channels == self.channels)

    def through_layer(self, layer: nn.Module, h: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``layer(h + modulation(h, z))`` for the ``M`` samples of ``z``, given ``out = layer(h)``.

        ``layer`` is linear, so ``layer(h + W_out y) = layer(h) + layer_0(W_out y)`` (``layer_0``
        without its bias), and ``layer_0(W_out .)`` is one Linear / Conv with ``W_out`` folded
        into its weight: the ``M`` samples then cost ``D`` channels each, not the ``C`` of the
        features, and never go through ``W_out``. Batch ``M * B``, sample-major.
        """
        y, fan = self._transformed_rows(h, z)
        folded = self._out_through(layer).to(y.dtype)  # (F_out | C_out, D, *kernel)
        if type(layer) is nn.Linear:
            delta = (y @ folded.T).reshape(fan, *out.shape)
        else:
            y_map = self._unrows(y, torch.Size((fan * h.shape[0], self.latent_dim, *h.shape[2:])))
            delta = layer._conv_forward(y_map, folded, None).reshape(fan, *out.shape)
        return (out.unsqueeze(0) + delta).reshape(fan * out.shape[0], *out.shape[1:])

    def _out_through(self, layer: nn.Module) -> torch.Tensor:
        """``layer``'s weight times ``W_out``: ``(F_out, D)`` or ``(C_out, D, *kernel)``."""
        return torch.einsum("oc...,cd->od...", layer.weight, self.w_out.weight)

    def transform_matrices(self, latents: torch.Tensor) -> torch.Tensor:
        """``(K, D, D)``: the linear map ``r -> latent_transform(r, v(z_k), s)`` of each latent
        ``z_k`` of ``latents (K, D)``, ``prod_l (s_l I + v_l v_l^T)``. Computed by the fused op
        on the ``D`` unit vectors, so that its math stays in one place."""
        k, d = latents.shape[0], self.latent_dim
        v = self.hyper(latents).reshape(k, self.hyper_layers, d).transpose(0, 1)  # (L, K, D)
        unit = torch.eye(d, device=latents.device, dtype=v.dtype).repeat(k, 1)  # (K * D, D)
        y = ops.latent_transform(unit, v.repeat_interleave(d, dim=1), F.softplus(self.c).to(v.dtype))
        return y.reshape(k, d, d).transpose(1, 2)  # y[k, j] = M_k e_j, a column of M_k

    def through_layer_shared(self, layer: nn.Module, h: torch.Tensor, latents: torch.Tensor, out: torch.Tensor
                             ) -> torch.Tensor:
        """``through_layer`` when every example takes each of the same ``K`` latents ``(K, D)``
        (the categorical identifier's codes): batch ``K * B``, component-major (``k * B + b``).

        The modulation is then one linear map per component, ``W_out M_k W_in``, so ``layer(h +
        W_out M_k W_in h)`` folds into ``layer``'s weight as ``K`` extra output channels: one
        Linear / Conv on the ``B`` examples' features, with nothing computed per component and
        position.
        """
        k, b = latents.shape[0], h.shape[0]
        m = self.transform_matrices(latents.to(h.dtype))  # (K, D, D)
        # (K, F_out | C_out, C, *kernel): layer o W_out o M_k o W_in for each component
        folded = torch.einsum("od...,kde,ef->kof...", self._out_through(layer), m, self.w_in.weight)
        folded = folded.flatten(0, 1).to(h.dtype)
        if type(layer) is nn.Linear:
            delta = (h @ folded.T).reshape(*h.shape[:-1], k, -1).movedim(-2, 0)  # (K, B, ..., F_out)
        else:
            delta = layer._conv_forward(h, folded, None)  # (B, K * C_out, *S)
            delta = delta.reshape(b, k, -1, *delta.shape[2:]).transpose(0, 1)  # (K, B, C_out, *S)
        return (out.unsqueeze(0) + delta).reshape(k * b, *out.shape[1:])

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``h + W_out latent_transform(W_in h, v(z), s)``; batch ``M * B`` when ``z`` fans out."""
        mod = self.modulation(h, z)
        fan = mod.shape[0] // h.shape[0]
        if fan > 1:
            return (h.unsqueeze(0) + mod.reshape(fan, *h.shape)).reshape(mod.shape)
        return h + mod
