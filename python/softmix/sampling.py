"""Sampling: DDPM and DDIM loops on the fused ``softmix.ops.denoise_step``.

The chain runs over ``steps`` respaced timesteps of the schedule (``NoiseSchedule.respace``,
trailing spacing). At every step an ``SMD`` model gets a fresh latent noise ``eta`` drawn from
the same generator, so a seeded generator makes the whole sample reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from softmix import ops
from softmix.schedule import NoiseSchedule
from softmix.wrap import _unwrap, is_smd, model_output_tensor

__all__ = ["sample", "METHODS"]

# method -> DDIM eta: 1 is DDPM ancestral sampling (fixed_small variance), 0 is DDIM
METHODS = {"ddpm": 1.0, "ddim": 0.0}


@torch.no_grad()
def sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    steps: int = 10,
    method: str = "ddpm",
    generator: torch.Generator | None = None,
    progress: bool = True,
    clip_sample: float | None = None,
    prediction_type: str = "epsilon",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    x_T: torch.Tensor | None = None,
    ddim_eta: float | None = None,
    return_trajectory: bool = False,
    final_width: float = 0.0,
    **model_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw samples from ``model`` by running the backward chain.

    Args:
        model: an ``SMD`` model or a plain denoiser ``model(x_t, t, **model_kwargs)``.
        schedule: the schedule the model was trained with.
        shape: ``(B, F)`` or ``(B, C, *S)`` of the samples.
        steps: number of sampling steps, ``1 .. schedule.num_steps`` (respaced).
        method: ``"ddpm"`` (ancestral, ``eta = 1``) or ``"ddim"`` (deterministic, ``eta = 0``).
        generator: draws the initial noise, the step noise and SMD's latent noise.
        progress: show a tqdm progress bar.
        clip_sample: clip the predicted ``x0`` to ``[-clip_sample, clip_sample]``.
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample``.
        device, dtype: of the samples (default: the model's device).
        x_T: start from this ``(B, ...)`` tensor instead of fresh noise.
        ddim_eta: override the DDIM ``eta`` of ``method``.
        return_trajectory: also return the list of states ``[x_T, ..., x_0]``.
        final_width: draw each sample from ``N(x0_hat, final_width^2 I)`` around the last
            step's estimate ``x0_hat`` instead of taking ``x0_hat`` itself (0, the default). For
            a categorical model, ``softmix.loss.fit_final_width`` fits it to the data: the
            components' own width at the last step.
        **model_kwargs: passed to the model at every step.

    Returns:
        ``(B, ...)`` samples (and the trajectory when asked).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {tuple(METHODS)}")
    if not (math.isfinite(final_width) and final_width >= 0):
        raise ValueError(f"final_width must be a finite number >= 0, got {final_width}")
    timesteps, a_t, a_prev = schedule.respace(steps)  # validates steps
    eta_ddim = METHODS[method] if ddim_eta is None else float(ddim_eta)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device

    def randn(shp):
        return torch.randn(tuple(shp), generator=generator, device=gen_device, dtype=torch.float32).to(device, dtype)

    x = randn(shape) if x_T is None else x_T.to(device, dtype)
    b = x.shape[0]
    smd = _unwrap(model) if is_smd(model) else None
    was_training = model.training
    model.eval()
    trajectory = [x] if return_trajectory else None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(range(len(timesteps)), desc=f"sampling ({method}, {steps} steps)", disable=not progress, leave=False)
        for i in bar:
            t = torch.full((b,), int(timesteps[i]), device=device, dtype=torch.long)
            kwargs = dict(model_kwargs)
            if smd is not None:
                kwargs["eta"] = smd.sample_eta(x, generator)  # fresh latent noise per step
            out = model_output_tensor(model(x, t, **kwargs)).to(dtype)
            noise = randn(x.shape) if eta_ddim != 0 else None
            x, _ = ops.denoise_step(
                x,
                out,
                a_t[i].to(device=device, dtype=dtype).expand(b),
                a_prev[i].to(device=device, dtype=dtype).expand(b),
                noise=noise,
                eta=eta_ddim,
                prediction_type=prediction_type,
                clip_sample=clip_sample,
            )
            if trajectory is not None:
                trajectory.append(x)
        if final_width:  # the last step went to alpha_bar = 1: x is x0_hat
            x = x + final_width * randn(x.shape)
            if trajectory is not None:
                trajectory[-1] = x
    finally:
        model.train(was_training)
    return (x, trajectory) if return_trajectory else x
