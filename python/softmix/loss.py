"""The training objective: the DDPM loss for a plain denoiser, the SMD Monte Carlo bound for
an ``SMD`` model, through one function.

For a batch ``x0`` the loss draws ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, forms
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``, evaluates the prediction for ``M`` samples of the
SMD latent noise ``eta`` and reduces them with ``softmix.ops.mc_loss``:

- ``bound="jensen"`` (the paper's): ``w * mean_m e_m``, one bound on ``-log p`` per sample;
- ``bound="logmeanexp"``: ``-T log mean_m exp(-w e_m / T)``, the importance-weighted bound
  (tighter; equal to ``"jensen"`` for ``M = 1``).

with ``e_m = mean (pred_m - target)^2``. A plain denoiser is evaluated once (``M = 1``): the
ordinary "simple" DDPM loss.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from softmix import ops
from softmix.schedule import NoiseSchedule
from softmix.wrap import _unwrap, is_smd, model_output_tensor

__all__ = ["training_loss", "DEFAULT_BOUND", "DEFAULT_NUM_SAMPLES", "BOUNDS"]

BOUNDS = ("jensen", "logmeanexp")
# The library's recommended configuration. The paper trains with "jensen", whose optimum
# is a collapsed mixture (the plain model); "logmeanexp" over a few samples keeps the
# mixture. Issue 4's experiments decide the final choice; these are the starting point.
DEFAULT_BOUND = "logmeanexp"
DEFAULT_NUM_SAMPLES = 4


def training_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    num_samples: int | None = None,
    bound: str | None = None,
    temperature: float = 1.0,
    prediction_type: str = "epsilon",
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    weight: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> torch.Tensor:
    """The diffusion training loss of ``model`` on a batch ``x0``.

    Args:
        model: an ``SMD`` model (also inside DDP / ``torch.compile``) or a plain denoiser
            ``model(x_t, t, **model_kwargs)``.
        schedule: the noise schedule.
        x0: ``(B, F)`` or ``(B, C, *S)`` clean data.
        num_samples: ``M``, samples of ``eta`` per example (SMD only); default
            ``DEFAULT_NUM_SAMPLES``.
        bound: ``"jensen"`` or ``"logmeanexp"``; default ``DEFAULT_BOUND``.
        temperature: ``T`` of the ``"logmeanexp"`` bound.
        prediction_type: what the model predicts: ``epsilon`` | ``v_prediction`` | ``sample``.
        t, noise, eta: fix the timesteps ``(B,)``, the noise ``(B, ...)`` or the latent noise
            ``(M * B, ...)`` (sample-major) instead of drawing them.
        weight: per-example weight ``w_t``: a ``(B,)`` tensor or a function of ``t``; default 1.
        generator: draws ``t``, ``noise`` and ``eta``.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (``(B,)``).
        **model_kwargs: passed to the model (``encoder_hidden_states``, ``class_labels``...).

    When the only injection point is before the model's last layer (``inject="output"``),
    the backbone runs once for the batch and only the head and the last layer run on the
    ``M * B`` samples; otherwise the ``M`` samples are batched through the whole model.
    """
    bound = DEFAULT_BOUND if bound is None else bound
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; expected one of {BOUNDS}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    b = x0.shape[0]
    device = x0.device
    gen_device = generator.device if generator is not None else device
    if t is None:
        t = schedule.sample_timesteps(b, device=device, generator=generator)
    t = torch.as_tensor(t, device=device).long().reshape(b)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t, prediction_type)

    smd = _unwrap(model) if is_smd(model) else None
    if smd is not None:
        m = DEFAULT_NUM_SAMPLES if num_samples is None else int(num_samples)
        if m < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if eta is None:
            eta = smd.sample_eta(x_t, generator, num_samples=m)
        elif eta.shape[0] != m * b:
            raise ValueError(f"eta must have batch num_samples * B = {m * b}, got {eta.shape[0]}")
        # SMD.forward sees eta of batch M * B and runs forward_samples; going through
        # model(...) keeps DDP / torch.compile wrappers in the loop
        out = model(x_t, t, eta=eta, **model_kwargs)
        pred = model_output_tensor(out).reshape(m, *x0.shape)
    else:
        pred = model_output_tensor(model(x_t, t, **model_kwargs)).unsqueeze(0)
    if weight is None:
        w = torch.ones(b, device=device, dtype=pred.dtype)
    elif callable(weight):
        w = torch.as_tensor(weight(t), device=device, dtype=pred.dtype).reshape(b)
    else:
        w = torch.as_tensor(weight, device=device, dtype=pred.dtype).reshape(b)
    per_example = ops.mc_loss(pred, target.to(pred.dtype), w, bound=bound, temperature=temperature)
    return per_example.mean() if reduction == "mean" else per_example

