"""A per-step conditional VAE for SMD: a posterior encoder ``q(eta | x_t, x_0, t)`` and its
evidence lower bound.

SMD's backward step is ``p(x_{t-1} | x_t) = E_{eta ~ N(0, I)} N(mu(x_t, eta), sigma_t^2 I)``. The
Monte Carlo bounds of ``softmix.training_loss`` draw ``eta`` from the prior and hope one of the
``M`` draws lands near the component that explains the example. A posterior encoder instead
*infers* the ``eta`` that explains the example and pays for it with a KL term::

    eta ~ q(eta | x_t, x_0, t) = N(m, diag(s^2))                       (reparameterised)
    -log p(x_{t-1} | x_t) <= k_t e(pred(x_t, eta), target) + KL(q || N(0, I))

with ``k_t`` the exact per-step sharpness (``softmix.loss.step_precision``) and ``e`` the
mean-squared prediction error. The loss is divided by ``k_t`` (the "simple" scale, as the
``"posterior"`` bound does): ``e + beta KL / k_t``. Where a step is sharp (few steps, late in
the chain) the KL is cheap relative to the fit and the latent is used; where it is wide the
KL wins, the encoder collapses to the prior and SMD reduces to the plain model. Sampling is
unchanged: ``eta ~ N(0, I)`` at every step. The encoder is needed only for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softmix.head import timestep_embedding
from softmix.loss import DEFAULT_MIN_VARIANCE, noised_batch, randn_on, step_precision
from softmix.schedule import NoiseSchedule
from softmix.wrap import _unwrap, is_smd, model_output_tensor

__all__ = ["PosteriorEncoder", "elbo_loss"]


class PosteriorEncoder(nn.Module):
    """``q(eta | x_t, x_0, t)``: ``(x_t, x_0, t) -> (mean, log_var)`` of SMD's latent noise.

    Vectors ``(B, F)``: an MLP on ``concat(x_t, x_0, time embedding)``. Images
    ``(B, C, H, W)``: a small conv net on ``concat(x_t, x_0)`` plus a time embedding. The
    output has the shape of ``eta``: ``(B, noise_channels, *S)``.
    """

    def __init__(self, in_channels: int, noise_channels: int | None = None, hidden: int = 128,
                 image: bool = False, time_dim: int = 32):
        super().__init__()
        noise_channels = in_channels if noise_channels is None else noise_channels
        self.image, self.time_dim = image, time_dim
        self.time = nn.Linear(time_dim, hidden)
        if image:
            self.inp = nn.Conv2d(2 * in_channels, hidden, 3, padding=1)
            self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.out = nn.Conv2d(hidden, 2 * noise_channels, 1)
        else:
            self.inp = nn.Linear(2 * in_channels, hidden)
            self.mid = nn.Linear(hidden, hidden)
            self.out = nn.Linear(hidden, 2 * noise_channels)
        nn.init.zeros_(self.out.weight)  # q = N(0, I) = the prior at init
        nn.init.zeros_(self.out.bias)

    @classmethod
    def for_model(cls, model: nn.Module, hidden: int = 128) -> "PosteriorEncoder":
        """An encoder matching an ``SMD`` model's ``eta``."""
        smd = _unwrap(model)
        return cls(smd.in_channels_, smd.noise_channels, hidden=hidden, image=smd._image)

    def forward(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.time(timestep_embedding(t, self.time_dim).to(x_t.dtype))
        if self.image:
            temb = temb[:, :, None, None]
        h = F.silu(self.inp(torch.cat([x_t, x0.to(x_t.dtype)], dim=1)) + temb)
        h = F.silu(self.mid(h))
        mean, log_var = self.out(h).chunk(2, dim=1)
        return mean, log_var.clamp(-12.0, 6.0)


def elbo_loss(
    model: nn.Module,
    encoder: PosteriorEncoder,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    kl_weight: float = 1.0,
    prediction_type: str = "epsilon",
    *,
    min_variance: float = DEFAULT_MIN_VARIANCE,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs,
) -> torch.Tensor:
    """The per-step conditional-VAE loss of an ``SMD`` model, ``e + kl_weight KL / k_t``.

    Args:
        model: an ``SMD`` model (also inside DDP / ``torch.compile``).
        encoder: its ``PosteriorEncoder`` (trained jointly: give its parameters to the optimiser).
        schedule, x0, prediction_type, t, noise, generator, reduction, model_kwargs: as
            ``softmix.training_loss``.
        kl_weight: ``beta`` of a beta-VAE (1: the evidence lower bound).
        min_variance: floor of the per-step variance (``step_precision``).
    """
    if not is_smd(model):
        raise ValueError("elbo_loss needs an SMD model (a plain denoiser has no latent)")
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    t, x_t, target = noised_batch(schedule, x0, prediction_type, t, noise, generator)
    mean, log_var = encoder(x_t, x0, t)
    std_noise = randn_on(mean.shape, mean, generator)
    eta = mean + (0.5 * log_var).exp() * std_noise
    pred = model_output_tensor(model(x_t, t, eta=eta, **model_kwargs))
    err = (pred - target).square().flatten(1).mean(1)  # (B,)
    kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).flatten(1).sum(1)  # KL(q || N(0, I)), nats
    k = step_precision(schedule, t, x0[0].numel(), prediction_type, min_variance).to(x0.device, err.dtype)
    per_example = err + kl_weight * kl / k
    return per_example.mean() if reduction == "mean" else per_example
