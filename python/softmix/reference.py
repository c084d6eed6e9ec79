"""Plain PyTorch versions of the three fused operators.

These are the ground truth the tests compare the kernels against (usually in float64) and
the baselines the benchmarks time. They are written for clarity, not speed: every line is
the formula of DESIGN.md section 3 as it reads.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "latent_transform",
    "latent_transform_materialized",
    "mc_loss",
    "denoise_step",
]


def latent_transform(r: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The factored SMD modulation: ``y_l = v_l <v_l, y_{l-1}> + s_l y_{l-1}``, ``y_0 = r``.

    Shapes: ``r (N, D)``, ``v (L, N, D)``, ``s (L,)`` or ``(L, N)``; returns ``y_L (N, D)``.
    """
    y = r
    for layer in range(v.shape[0]):
        v_l = v[layer]
        s_l = s[layer].reshape(-1, 1) if s.dim() == 2 else s[layer]
        y = v_l * (v_l * y).sum(-1, keepdim=True) + s_l * y
    return y


def latent_transform_materialized(r: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The same map as the paper's code computes it: a dense ``D x D`` matrix per position.

    ``M_l = v_l v_l^T + s_l I`` is built for every position and applied with a batched
    matrix-vector product. Memory grows as ``N * D^2``; kept as the benchmark baseline.
    """
    n, d = r.shape
    eye = torch.eye(d, dtype=r.dtype, device=r.device)
    y = r
    for layer in range(v.shape[0]):
        v_l = v[layer]
        s_l = s[layer].reshape(-1, 1, 1) if s.dim() == 2 else s[layer]
        matrix = v_l.unsqueeze(-1) * v_l.unsqueeze(-2) + s_l * eye  # (N, D, D)
        y = torch.bmm(matrix, y.unsqueeze(-1)).squeeze(-1)
    return y


def mc_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    bound: str = "jensen",
    temperature: float = 1.0,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Monte Carlo SMD loss per example.

    ``pred (M, B, *S)``, ``target (B, *S)``, ``weight (B,)``; with
    ``e[m, b] = mean_S (pred[m, b] - target[b])^2``:

    - ``"jensen"``: ``weight[b] * mean_m e[m, b]``
    - ``"logmeanexp"``: ``-T log mean_m exp(-weight[b] e[m, b] / T)``

    With ``log_weights (M, B)``, ``lw = log pi`` of a weighted mixture, the means over ``m``
    become sums weighted by ``pi``:

    - ``"jensen"``: ``weight[b] * sum_m pi[m, b] e[m, b]``
    - ``"logmeanexp"``: ``-T log sum_m exp(lw[m, b] - weight[b] e[m, b] / T)``
    """
    num_samples = pred.shape[0]
    err = (pred - target.unsqueeze(0)).square()
    if err.dim() > 2:  # S = () leaves one squared difference per example
        err = err.flatten(2).mean(-1)  # (M, B)
    if bound == "jensen":
        if log_weights is None:
            return weight * err.mean(0)
        return weight * (log_weights.exp() * err).sum(0)
    if bound == "logmeanexp":
        scaled = -weight.unsqueeze(0) * err / temperature
        if log_weights is None:
            return -temperature * (torch.logsumexp(scaled, dim=0) - math.log(num_samples))
        return -temperature * torch.logsumexp(log_weights + scaled, dim=0)
    raise ValueError(f"unknown bound {bound!r}; expected 'jensen' or 'logmeanexp'")


def _per_sample(alpha: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` so it broadcasts against ``like``."""
    return alpha.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def denoise_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    noise: torch.Tensor | None = None,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One backward step of DDPM (``eta=1``) or DDIM (``eta=0``), as in DESIGN.md 3.3.

    Returns ``(x_prev, x0_pred)``. ``noise=None`` adds no noise (the mean of the step).
    """
    a_t = _per_sample(alpha_bar_t, x_t)
    a_prev = _per_sample(alpha_bar_prev, x_t)
    if prediction_type == "epsilon":
        x0 = (x_t - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * model_output
    elif prediction_type == "sample":
        x0 = model_output
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    direction = (1 - a_prev - sigma.square()).clamp_min(0).sqrt()
    x_prev = a_prev.sqrt() * x0 + direction * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0
