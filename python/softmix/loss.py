"""The training objective: the DDPM loss for a plain denoiser, the SMD Monte Carlo bound for
an ``SMD`` model, through one function.

For a batch ``x0`` the loss draws ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, forms
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``, evaluates the prediction for ``M`` samples of the
SMD latent noise ``eta`` and reduces them with ``softmix.ops.mc_loss``:

- ``bound="jensen"`` (the paper's): ``w * mean_m e_m``, one bound on ``-log p`` per sample;
- ``bound="logmeanexp"``: ``-T log mean_m exp(-w e_m / T)``, the importance-weighted bound
  (tighter; equal to ``"jensen"`` for ``M = 1``);
- ``bound="posterior"``: the importance-weighted bound at the *exact per-step sharpness*
  ``k_t`` (``step_precision``): ``-(T / k_t) log mean_m exp(-k_t w e_m / T)``. With ``T = 1``
  this is ``1 / k_t`` times ``-log mean_m N(mu_t(target); mu_t(pred_m), sigma_t^2 I)`` up to a
  constant: the Monte Carlo estimate of the mixture's negative log-likelihood of the step
  ``x_t -> x_{t-1}``, divided by ``k_t`` so that every step's gradient has the scale of the
  ordinary "simple" loss. Where the posterior is narrow (few steps, late in the chain) ``k_t``
  is large and the bound assigns each example to the nearest of the ``M`` components (the
  mixture keeps its modes); where it is wide (many steps) ``k_t`` is small and the bound is
  the Jensen bound (the mixture may collapse to the plain model, which is then right).
  ``sharpen=f`` trains the last steps (``alpha_bar_t >= sharpen_min_signal``) at ``f k_t``, as
  if their Gaussian were ``f`` times narrower (``sharpened_precision``).

- ``bound="clean"``: the mixture's likelihood of the *clean sample* ``x0`` rather than of the
  step: ``-T log mean_m exp(-c_t w e_m / T)`` with ``c_t = F g_t^2 / (2 s^2)``
  (``clean_precision``), which is ``-log mean_m N(x0; x0_m, s^2 I)`` up to a constant at
  ``T = 1``: each sample's ``x0`` estimate ``x0_m`` is a component of width ``s``
  (``clean_width``), and ``g_t`` turns the prediction's error into that of ``x0``. Unlike the
  step's own sharpness ``k_t``, which falls fast with the step size (at T = 20 the middle steps'
  likelihood barely tells the modes of the 7x7 grid apart), ``c_t`` is the same at every step in
  ``x0`` units, so every step's mixture learns the modes of ``q(x0 | x_t)``; the sampler then
  draws one ``x0`` estimate and takes the DDPM step to it, which is exact when the mixture is.

with ``e_m = mean (pred_m - target)^2``. A plain denoiser is evaluated once (``M = 1``): the
ordinary "simple" DDPM loss.

An ``SMD`` model with a categorical identifier (``SMD(..., identifier="categorical")``) is a
finite mixture with weights ``pi_k(x_t, t)``: its ``K`` components are enumerated instead of
sampled, and the bounds take the weights: ``"posterior"`` is the exact mixture likelihood
``-(T / k_t) log sum_k pi_k exp(-k_t w e_k / T)``, ``"logmeanexp"`` the same with ``k_t = 1``,
``"jensen"`` ``w sum_k pi_k e_k``, ``"clean"`` ``-T log sum_k pi_k exp(-c_t w e_k / T)``
(``categorical_bound``). Under ``"posterior"`` the weights
learn from the likelihood itself, ``-T log sum_k pi_k exp(-k_t w e_k / T)``: dividing it by
``k_t`` gives the components the gradient scale of the plain loss, but would also divide the
weights' gradient ``T (pi - r)`` (``r`` the responsibilities) by ``k_t``, 1000 at the last step
of the 7x7 grid, where the weights must be sharpest; there they would barely learn (7x7 grid at
T = 10: 23% of the samples on the modes with the divided gradient, 56-72% without, six runs;
benchmarks/results/quality.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from softmix import ops
from softmix.schedule import NoiseSchedule
from softmix.wrap import _unwrap, is_smd, model_output_tensor

__all__ = ["training_loss", "step_precision", "sharpened_precision", "clean_precision", "fit_final_width",
           "categorical_bound", "DEFAULT_BOUND", "DEFAULT_CATEGORICAL_BOUND", "DEFAULT_NUM_SAMPLES", "BOUNDS",
           "DEFAULT_MIN_VARIANCE", "DEFAULT_CLEAN_WIDTH", "DEFAULT_CLEAN_HUBER", "huber_tail", "SHARPEN_MIN_SIGNAL"]

BOUNDS = ("jensen", "logmeanexp", "posterior", "clean")
# The posterior variance of the last step (x_1 -> x_0) is 0; the "posterior" bound floors the
# per-step variance at this value (data scaled to [-1, 1]: about the variance of one mode of
# the 7x7 toy, (0.033)^2).
DEFAULT_MIN_VARIANCE = 1e-3
# The "clean" bound's component width in data units (data scaled to [-1, 1]). On the 7x7 toy
# (mode std 0.033; categorical identifier, x0 prediction, T = 4, 3 seeds) narrower is better:
# width 0.1 / 0.06 / 0.03 / 0.015: 78% / 84% / 95% / 100% of the samples on the modes; at
# T = 10 and 20, 0.015 and 0.03 measure alike (benchmarks/results/quality.md).
DEFAULT_CLEAN_WIDTH = 0.015
# The "clean" bound's Huber tail, in component widths (huber_tail). Unbounded, one example that no
# component covers can carry a whole step (its gradient grows with its distance / width^2) and
# undo modes. On the 7x7 toy (categorical identifier, x0, fitted width, 6 seeds) the tail at 10
# widths covers 48.5 / 49.0 / 48.3 / 48.7 of 49 modes at T = 4 / 10 / 20 / 50 against 46.8 /
# 48.2 / 47.5 / 47.2 without, MMD 0.0047-0.0056 against 0.0060-0.0122 (quality.md, "A Huber tail").
DEFAULT_CLEAN_HUBER = 10.0
# The "posterior" bound's sharpen: the steps it sharpens are those whose x_t keeps at least this
# share of the signal, alpha_bar_t, so that they are the same part of any chain. Measured on the
# 8x8 digits at T = 10 with the steps t < 3 (alpha_bar_t = 0.90, 0.66, 0.40; t = 3: 0.20): with a
# categorical identifier whose weights see positions (identifier_grid) and sharpen=5, FD 0.72x the
# plain model's (4 seeds); sharpen=20 was worse (benchmarks/results/quality.md, "Is it the
# Gaussian's shape or its variance?"). At T = 4 this is the step t = 0 alone (0.52; t = 1: 0.08).
SHARPEN_MIN_SIGNAL = 0.3
# The library's recommended configuration, from issue 4's experiments
# (benchmarks/results/quality.md: 7x7 grid of Gaussians, trained and sampled at T steps,
# 3 seeds):
# - "jensen" (the paper's) is minimised by a collapsed mixture and measures as the plain
#   model (T = 4: MMD to the data 0.400 vs 0.398); "logmeanexp" with weight 1 is the Jensen
#   bound in practice (w e is small) and measures the same (0.40 at M = 4 and 16);
# - "posterior" (logmeanexp at the exact per-step sharpness k_t) keeps the mixture where the
#   posterior is multimodal: T = 4: MMD 0.029 (0.07x the plain model's), 38 of 49 modes
#   covered vs 19; T = 10: MMD 0.044 vs 0.088. At T = 1000 k_t is small and it acts as the
#   Jensen bound (high-quality share 85.2% vs the plain model's 86.9% and the paper's 85.4%);
# - M = 16: MMD 0.28 / 0.12 / 0.050 / 0.030 at M = 2 / 4 / 8 / 16 (T = 4), for 7.2 / 7.5 /
#   9.0 / 12.4 ms per step with output-only injection (the backbone runs once for all M).
# Neither bound raises the share of samples within 3 std of a mode at T = 4 (about 29% for
# SMD and the plain model): see the results page. At T = 50 "posterior" is worse than the
# plain model (high-quality share 43% vs 63%, 3 seeds): it helps at T <= 10.
# A categorical identifier (SMD(identifier="categorical"), softmix.categorical) with x0
# prediction and the "clean" bound (its default) puts 97-100% of the 7x7 grid's samples on the
# modes at T = 4, 10, 20 and 50 (3 seeds; plain: 28-63%), and the "posterior" bound does only
# up to T = 4 (62% at T = 10, 30% at T = 20 and 50). Under "posterior" the steps t >= 1 of a
# longer chain barely tell the modes apart (k_t small): there the components, shared by every
# step, regress the posterior mean, and at T = 20 they sit off the modes at t = 0 as well,
# where drawing from the exact posterior at that step alone would put 99% on them. It stays an
# option, not the default: it needs x0 prediction (with eps or v: 25-28% at T = 10), which the
# wrapper cannot choose, K of about the number of modes and a width that suits the data; at
# T = 1000 it needs its weights from Fourier features of x_t (identifier_fourier). On digits it lowers the FD to 0.36x the
# plain model's at T = 4 but not at T = 10 (1.02x-1.50x, by width), with weights from the average
# of the image over positions; with weights that see a grid of positions (SMD's identifier_grid,
# now its default for images) it beats the plain model at 4, 10 and 50 steps (softmix.categorical,
# POSITION_GRID). The "posterior" bound sharpened at the last steps (sharpen=5) with the grid
# gave 0.72x at T = 10 (4 seeds, 12000 training steps), less than "clean" with the grid; it stays
# an option (benchmarks/results/quality.md).
DEFAULT_BOUND = "posterior"
DEFAULT_NUM_SAMPLES = 16
DEFAULT_CATEGORICAL_BOUND = "clean"


def _x0_error_per_prediction_error(a_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """``g_t``: the error of the ``x0`` a prediction implies, per unit error of the prediction
    (``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``): ``sample`` 1; ``epsilon``
    ``sqrt(1 - a_t) / sqrt(a_t)``; ``v_prediction`` ``sqrt(1 - a_t)``."""
    if prediction_type == "sample":
        return torch.ones_like(a_t)
    if prediction_type == "epsilon":
        return ((1 - a_t) / a_t).sqrt()
    if prediction_type == "v_prediction":
        return (1 - a_t).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def step_precision(
    schedule: NoiseSchedule,
    t: torch.Tensor,
    features: int,
    prediction_type: str = "epsilon",
    min_variance: float = DEFAULT_MIN_VARIANCE,
) -> torch.Tensor:
    """``k_t (B,)``: the sharpness of the backward step ``x_t -> x_{t-1}`` in units of the
    model's mean-squared prediction error.

    The model's step mean is ``mu = mu_t(x_t, pred)``, affine in the prediction with slope
    ``c_t`` (``epsilon``: ``beta_t / (sqrt(alpha_t) sqrt(1 - alpha_bar_t))``; ``sample``:
    ``sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)``; ``v_prediction``:
    ``sqrt(alpha_bar_{t-1}) beta_t / sqrt(1 - alpha_bar_t)``: the ``sample`` slope times the
    ``x0`` error per prediction error), and its variance is the
    posterior variance ``sigma_t^2 = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t``
    (floored at ``min_variance``). With ``e = mean_F (pred - target)^2`` over ``F`` features,
    ``log N(mu(target); mu(pred), sigma_t^2 I) = -k_t e + const`` with
    ``k_t = F c_t^2 / (2 sigma_t^2)``.
    """
    t = torch.as_tensor(t).long().cpu()
    a = schedule.alphas_cumprod.double()
    a_t = a[t]
    a_prev = torch.where(t > 0, a[(t - 1).clamp(min=0)], torch.ones_like(a_t))
    beta = 1 - a_t / a_prev
    c = a_prev.sqrt() * beta / (1 - a_t) * _x0_error_per_prediction_error(a_t, prediction_type)
    var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=min_variance)
    return (features * c.square() / (2 * var)).float()


def sharpened_precision(
    schedule: NoiseSchedule,
    t: torch.Tensor,
    precision: torch.Tensor,
    sharpen: float,
    min_signal: float = SHARPEN_MIN_SIGNAL,
) -> torch.Tensor:
    """``precision (B,)`` times ``sharpen`` at the steps ``t`` where ``alpha_bar_t >= min_signal``.

    A sharper ``k_t`` in the ``"posterior"`` bound trains those steps' components as if the step's
    Gaussian were narrower: each example counts for the component nearest to it, so the mixture
    stays spread where a single Gaussian step is furthest from the exact one, at the last steps
    (8x8 digits, T = 10: KL of the exact step from the plain model's 3.7 and 15.1 nats at t = 2
    and 1, from the Gaussian at the exact mean 2.6 and 4.8; benchmarks/results/quality.md)."""
    signal = schedule.alphas_cumprod.to(precision.device)[torch.as_tensor(t, device=precision.device).long()]
    return torch.where(signal >= min_signal, precision * sharpen, precision)


def _checked_sharpen(sharpen: Any, min_signal: Any, bound: str) -> tuple[float, float]:
    """``(sharpen, min_signal)`` as floats, or a ``ValueError`` naming the first that is out of
    range: ``sharpen`` positive and finite, and 1 for a ``bound`` other than ``"posterior"``;
    ``min_signal`` in ``[0, 1]``."""
    try:
        factor, signal = float(sharpen), float(min_signal)
    except (TypeError, ValueError):
        raise ValueError(f"sharpen and sharpen_min_signal must be numbers, got {sharpen!r}, {min_signal!r}") from None
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"sharpen must be a positive number (1: off), got {sharpen!r}")
    if factor != 1 and bound != "posterior":
        raise ValueError(f"sharpen applies to the \"posterior\" bound only; this run's bound is {bound!r}")
    if not 0 <= signal <= 1:
        raise ValueError(f"sharpen_min_signal must be a share of the signal in [0, 1], got {min_signal!r}")
    return factor, signal


def clean_precision(
    schedule: NoiseSchedule,
    t: torch.Tensor,
    features: int,
    prediction_type: str = "epsilon",
    width: float = DEFAULT_CLEAN_WIDTH,
) -> torch.Tensor:
    """``c_t (B,)``: the sharpness of ``N(x0; x0_hat, width^2 I)`` in units of the model's
    mean-squared prediction error, ``c_t = F g_t^2 / (2 width^2)``.

    ``g_t`` is the error of ``x0_hat`` per unit error of the prediction: ``sample``: 1;
    ``epsilon``: ``sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t)``; ``v_prediction``:
    ``sqrt(1 - alpha_bar_t)`` (from ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``).
    """
    width = _checked_clean_width(width)
    a_t = schedule.alphas_cumprod.double()[torch.as_tensor(t).long().cpu()]
    g = _x0_error_per_prediction_error(a_t, prediction_type)
    return (features * g.square() / (2 * width**2)).float()


def huber_tail(per_example: torch.Tensor, widths: float) -> torch.Tensor:
    """The ``"clean"`` bound's per-example losses ``L`` with a Huber tail at ``widths`` (``h``):
    a loss over ``L0 = h^2 / 2`` (an ``x0`` ``h`` component widths from the nearest component)
    becomes ``2 sqrt(L0 L) - L0``. The loss then grows as the distance rather than its square,
    so the gradient of one example that no component covers is bounded, as it is at ``L0``;
    unbounded, such an example can carry a whole step and undo the model's modes
    (benchmarks/results/quality.md, "A Huber tail"). Value and slope are continuous at ``L0``."""
    l0 = float(widths) ** 2 / 2
    return torch.where(per_example > l0, 2 * torch.sqrt(l0 * per_example.clamp(min=l0)) - l0, per_example)


def _checked_clean_huber(widths: Any, bound: str) -> float:
    """``widths`` as a float (``None``: ``DEFAULT_CLEAN_HUBER`` for the ``"clean"`` bound, else 0),
    or a ``ValueError`` naming ``clean_huber`` unless it is 0 or positive and finite, and 0 for
    a ``bound`` other than ``"clean"``."""
    if widths is None:
        return DEFAULT_CLEAN_HUBER if bound == "clean" else 0.0
    try:
        ok = math.isfinite(float(widths)) and float(widths) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"clean_huber must be 0 (off) or a positive number of widths, got {widths!r}")
    if float(widths) and bound != "clean":
        raise ValueError(f"clean_huber applies to the \"clean\" bound only; this run's bound is {bound!r}")
    return float(widths)


def default_bound(categorical: bool) -> str:
    """The bound ``training_loss`` takes when none is given: ``DEFAULT_CATEGORICAL_BOUND`` for a
    categorical identifier, else ``DEFAULT_BOUND``."""
    return DEFAULT_CATEGORICAL_BOUND if categorical else DEFAULT_BOUND


def _checked_clean_width(width: Any) -> float:
    """``width`` as a float, or a ``ValueError`` naming ``clean_width`` unless it is positive and finite."""
    try:
        ok = math.isfinite(float(width)) and float(width) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"clean_width must be a positive number, got {width!r}")
    return float(width)


@torch.no_grad()
def fit_final_width(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    steps: int | None = None,
    prediction_type: str = "sample",
    clean_width: float = DEFAULT_CLEAN_WIDTH,
    iters: int = 100,
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> float:
    """The width ``s`` that makes a categorical model's last sampling step most likely to give ``x0``.

    At the last step of a ``steps``-step chain (``schedule.respace``; default every step) the
    model's density of the clean sample is ``sum_k pi_k N(x0; x0_k, s^2 I)``. Its components
    ``x0_k`` and weights ``pi_k`` stay as trained; ``s`` is fitted to ``x0`` (the data, or a
    held-out part of it) by maximum likelihood (EM from ``clean_width``, the training width).
    ``softmix.sample(..., final_width=s)`` then draws each sample from that density rather than
    taking its component's centre ``x0_k``. Returns ``s`` in data units.
    """
    smd = _unwrap(model) if is_smd(model) else None
    if smd is None or not smd.categorical:
        raise ValueError("fit_final_width needs an SMD model with identifier='categorical'")
    if x0.shape[0] < 1:
        raise ValueError("fit_final_width: x0 is empty")
    var = _checked_clean_width(clean_width) ** 2  # EM starts from the training width
    t_last = int(schedule.respace(schedule.num_steps if steps is None else steps)[0][-1])
    t, x_t, target = noised_batch(schedule, x0, prediction_type, torch.full((x0.shape[0],), t_last), None, generator)
    num, was_training = smd.identifier.num_components, model.training
    model.eval()  # as softmix.sample runs it
    try:
        pred = model_output_tensor(model(x_t, t, components=True, **model_kwargs)).reshape(num, *x0.shape)
    finally:
        model.train(was_training)
    log_pi, smd.last_log_weights = smd.last_log_weights.T.double(), None  # (K, B)
    g = _x0_error_per_prediction_error(schedule.alphas_cumprod.double()[t_last], prediction_type)
    sq = (pred.double() - target.double()).square().flatten(2).sum(-1) * g**2  # |x0_k - x0|^2, (K, B)
    features = x0[0].numel()
    for _ in range(iters):  # EM: responsibilities of the components, then the shared variance
        r = torch.softmax(log_pi - sq / (2 * var), dim=0)
        new = float((r * sq).sum(0).mean()) / features
        if abs(new - var) <= 1e-9 * var:
            break
        var = new
    return math.sqrt(var)


def randn_on(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of ``shape``, drawn on the generator's device, put on ``like``'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def noised_batch(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    prediction_type: str,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, x_t, target)`` for clean data ``x0``: timesteps and noise drawn unless given."""
    b = x0.shape[0]
    if t is None:
        t = schedule.sample_timesteps(b, device=x0.device, generator=generator)
    t = torch.as_tensor(t, device=x0.device).long().reshape(b)
    if noise is None:
        noise = randn_on(x0.shape, x0, generator)
    return t, schedule.add_noise(x0, noise, t), schedule.target(x0, noise, t, prediction_type)


def training_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    num_samples: int | None = None,
    bound: str | None = None,
    temperature: float = 1.0,
    prediction_type: str = "epsilon",
    *,
    min_variance: float = DEFAULT_MIN_VARIANCE,
    clean_width: float = DEFAULT_CLEAN_WIDTH,
    clean_huber: float | None = None,
    sharpen: float = 1.0,
    sharpen_min_signal: float = SHARPEN_MIN_SIGNAL,
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
            ``DEFAULT_NUM_SAMPLES`` (a categorical identifier enumerates its ``K`` components:
            ``None`` or ``K``).
        bound: ``"jensen"``, ``"logmeanexp"``, ``"posterior"`` or ``"clean"``; default
            ``DEFAULT_BOUND``, or ``DEFAULT_CATEGORICAL_BOUND`` for a categorical identifier.
        temperature: ``T`` of the ``"logmeanexp"``, ``"posterior"`` and ``"clean"`` bounds.
        prediction_type: what the model predicts: ``epsilon`` | ``v_prediction`` | ``sample``.
        t, noise, eta: fix the timesteps ``(B,)``, the noise ``(B, ...)`` or the latent noise
            ``(M * B, ...)`` (sample-major) instead of drawing them.
        weight: per-example weight ``w_t``: a ``(B,)`` tensor or a function of ``t``; default 1.
        generator: draws ``t``, ``noise`` and ``eta``.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (``(B,)``).
        min_variance: floor of the per-step variance in the ``"posterior"`` bound.
        clean_width: ``s``, the width of each component around its ``x0`` estimate in the
            ``"clean"`` bound, in data units.
        clean_huber: ``h`` > 0: the ``"clean"`` bound grows linearly, not quadratically, in the
            distance from ``x0`` to the components beyond ``h`` widths (``huber_tail``; at
            temperature 1 and weight 1); 0: off; default ``DEFAULT_CLEAN_HUBER`` for the
            ``"clean"`` bound (no other bound takes one).
        sharpen, sharpen_min_signal: the ``"posterior"`` bound's sharpness ``k_t`` times
            ``sharpen`` at the steps whose ``alpha_bar_t >= sharpen_min_signal``, the last ones
            (``sharpened_precision``); 1: off.
        **model_kwargs: passed to the model (``encoder_hidden_states``, ``class_labels``...).

    When the only injection point is before the model's last layer (``inject="output"``),
    the backbone runs once for the batch and only the head and the last layer run on the
    ``M * B`` samples, the head folded into that layer (``SMDHead.through_layer``; for a
    categorical identifier the ``K`` components are ``K`` extra output channels of it,
    ``SMDHead.through_layer_shared``); otherwise the ``M`` samples are batched through the
    whole model.
    """
    smd = _unwrap(model) if is_smd(model) else None
    if bound is None:
        bound = default_bound(smd is not None and smd.categorical)
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; expected one of {BOUNDS}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    clean_huber = _checked_clean_huber(clean_huber, bound)
    sharpen, sharpen_min_signal = _checked_sharpen(sharpen, sharpen_min_signal, bound)
    b, device = x0.shape[0], x0.device
    t, x_t, target = noised_batch(schedule, x0, prediction_type, t, noise, generator)

    if smd is not None and smd.categorical:
        num = smd.identifier.num_components
        if num_samples is not None and int(num_samples) != num:
            raise ValueError(f"a categorical identifier enumerates its K = {num} components: "
                             f"num_samples must be None or {num}, got {num_samples}")
        if eta is not None:
            raise ValueError("a categorical identifier enumerates its components: pass no eta")
        pred = model_output_tensor(model(x_t, t, components=True, **model_kwargs)).reshape(num, *x0.shape)
    elif smd is not None:
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
    # Weights stay in (at least) float32: under autocast the prediction is bf16 / fp16, and
    # rounding w_t or k_t (up to ~1e4) to 8 bits would change the bound's sharpness; mc_loss
    # accumulates in float32 and takes a float32 weight with a half prediction.
    w_dtype = torch.promote_types(pred.dtype, torch.float32)
    if weight is None:
        w = torch.ones(b, device=device, dtype=w_dtype)
    elif callable(weight):
        w = torch.as_tensor(weight(t), device=device, dtype=w_dtype).reshape(b)
    else:
        w = torch.as_tensor(weight, device=device, dtype=w_dtype).reshape(b)
    k = None
    if bound == "posterior":
        k = step_precision(schedule, t, x0[0].numel(), prediction_type, min_variance).to(device, w_dtype)
        if sharpen != 1:
            k = sharpened_precision(schedule, t, k, sharpen, sharpen_min_signal)
    if bound == "clean":  # the logmeanexp bound at x0's sharpness: its value is the likelihood itself
        c = clean_precision(schedule, t, x0[0].numel(), prediction_type, clean_width).to(device, w_dtype)
        bound, w = "logmeanexp", w * c
    if smd is not None and smd.categorical:
        log_weights, smd.last_log_weights = smd.last_log_weights, None  # taken, so the model holds no graph
        if k is not None:
            log_weights = gradient_scaled(log_weights, k.unsqueeze(1))
        per_example = categorical_bound(pred, target, log_weights.T, w, bound, temperature, k)
    elif bound == "posterior":
        # -(T / k) log mean exp(-k w e / T) = mc_loss(weight = k w) / k
        per_example = ops.mc_loss(pred, target.to(pred.dtype), w * k, bound="logmeanexp", temperature=temperature) / k
    else:
        per_example = ops.mc_loss(pred, target.to(pred.dtype), w, bound=bound, temperature=temperature)
    if clean_huber:
        per_example = huber_tail(per_example, clean_huber)
    return per_example.mean() if reduction == "mean" else per_example


def gradient_scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` itself, whose gradient is multiplied by ``scale`` on the way back."""
    return x.detach() + (x - x.detach()) * scale


def categorical_bound(
    pred: torch.Tensor,
    target: torch.Tensor,
    log_weights: torch.Tensor,
    weight: torch.Tensor,
    bound: str,
    temperature: float = 1.0,
    precision: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bounds of a finite mixture with weights: ``(B,)``.

    ``pred (K, B, *S)`` the ``K`` components' predictions, ``target (B, *S)``, ``log_weights
    (K, B)`` ``log pi_k`` (normalised over ``k``), ``weight (B,)`` ``w``. With ``e_k = mean_S
    (pred_k - target)^2``: ``"jensen"`` ``w sum_k pi_k e_k``; ``"logmeanexp"`` ``-T log sum_k
    pi_k exp(-w e_k / T)``; ``"posterior"`` ``-(T / k) log sum_k pi_k exp(-k w e_k / T)`` with
    ``precision`` ``k (B,)``. With equal weights these are ``ops.mc_loss``'s bounds; all three
    are ``ops.mc_loss`` with ``log_weights``, in float32 for half predictions (else pred's dtype).
    """
    if bound not in ("jensen", "logmeanexp") and not (bound == "posterior" and precision is not None):
        raise ValueError(f"categorical_bound: unknown bound {bound!r} (or no precision for 'posterior')")
    # the op takes target in pred's dtype, log-weights in the loss dtype (float32 beside half)
    loss_dtype = torch.promote_types(pred.dtype, torch.float32)
    target, log_weights, w = target.to(pred.dtype), log_weights.to(loss_dtype), weight.to(loss_dtype)
    if bound != "posterior":
        return ops.mc_loss(pred, target, w, bound, temperature, log_weights=log_weights)
    # -(T / k) log sum_k pi_k exp(-k w e_k / T) = mc_loss(weight = k w) / k, as in training_loss
    k = precision.to(loss_dtype)
    return ops.mc_loss(pred, target, k * w, "logmeanexp", temperature, log_weights=log_weights) / k
