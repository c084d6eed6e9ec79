"""The fused SMD operators: thin wrappers over ``torch.ops.softmix``.

This is the only module that knows about the compiled extension. Importing it loads
``softmix._C``, whose static initialisers register the operator schemas and the CPU (and,
when built, CUDA) kernels with the dispatcher, and the autograd formulas that call the fused
backward kernels (``csrc/autograd.cpp``). Here we add what the dispatcher needs from Python:
fake (meta) kernels so ``torch.compile`` can trace the ops and their backward ops.

Each operator is reachable both as ``softmix.ops.<name>`` and ``torch.ops.softmix.<name>``.
"""

from __future__ import annotations

import torch

from softmix import _C  # noqa: F401  (registers torch.ops.softmix.*)

__all__ = ["latent_transform", "mc_loss", "denoise_step", "cuda_kernels_built"]

BOUNDS = ("jensen", "logmeanexp")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def cuda_kernels_built() -> bool:
    """Whether this build of softmix carries the CUDA kernels."""
    return bool(_C.cuda_kernels_built())


# --------------------------------------------------------------------------------------
# latent_transform
# --------------------------------------------------------------------------------------


def latent_transform(r: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Apply the chain of rank-one-plus-scaled-identity maps of the SMD head.

    ``y_0 = r``, ``y_l = (v_l v_l^T + s_l I) y_{l-1} = v_l <v_l, y_{l-1}> + s_l y_{l-1}``,
    returns ``y_L``. The ``D x D`` matrices are never formed: O(L D) work per position.

    Args:
        r: ``(N, D)`` projected features, one row per position.
        v: ``(L, N, D)`` one vector per layer and position (from the hypernetwork).
        s: ``(L,)`` one scale per layer, or ``(L, N)`` one per layer and position.

    Returns:
        ``(N, D)``, the dtype of ``r``. Differentiable in ``r``, ``v`` and ``s``.
    """
    return torch.ops.softmix.latent_transform(r, v, s)


@torch.library.register_fake("softmix::latent_transform")
def _(r, v, s):
    torch._check(v.dim() == 3 and r.dim() == 2, lambda: "latent_transform: r must be (N, D), v (L, N, D)")
    return r.new_empty(r.shape)


@torch.library.register_fake("softmix::latent_transform_backward")
def _(grad_y, r, v, s):
    return r.new_empty(r.shape), v.new_empty(v.shape), s.new_empty(s.shape)


# --------------------------------------------------------------------------------------
# mc_loss
# --------------------------------------------------------------------------------------


def mc_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    bound: str = "jensen",
    temperature: float = 1.0,
    *,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Monte Carlo SMD loss, one value per example.

    With ``e[m, b] = mean_S (pred[m, b] - target[b])^2`` and mixture weights
    ``pi[m, b] = exp(log_weights[m, b])`` (``1 / M`` without ``log_weights``):

    - ``bound="jensen"``: ``loss[b] = weight[b] * sum_m pi[m, b] e[m, b]`` (the paper's bound);
    - ``bound="logmeanexp"``: ``loss[b] = -T log sum_m pi[m, b] exp(-weight[b] e[m, b] / T)``,
      the importance-weighted bound. It equals ``"jensen"`` for ``M = 1`` and never exceeds it.

    Without ``log_weights`` these are ``weight[b] * mean_m e[m, b]`` and
    ``-T log mean_m exp(-weight[b] e[m, b] / T)``: M equally likely Monte Carlo samples.

    Args:
        pred: ``(M, B, *S)`` M Monte Carlo samples of the model's prediction (or the M
            components of a finite mixture).
        target: ``(B, *S)`` what the prediction should match (the noise, ``v`` or ``x0``).
        weight: ``(B,)`` per-example weight ``w_t``.
        bound: ``"jensen"`` or ``"logmeanexp"``.
        temperature: ``T > 0`` of the ``"logmeanexp"`` bound.
        log_weights: ``(M, B)`` ``log pi``, normalised over ``m`` by the caller (the op does
            not renormalise), in the loss dtype (below). ``-inf`` marks a component of weight 0:
            it adds nothing to the loss and gets zero gradients; an example with no component
            of positive weight gets the bound's value there (``"logmeanexp"``: ``-T log 0 =
            +inf``; ``"jensen"``: 0) and zero gradients. ``None``: ``log(1 / M)`` each.

    Returns:
        ``(B,)`` in float32 for half inputs, else the dtype of ``pred``. Differentiable in
        ``pred``, ``target``, ``weight`` and ``log_weights``.
    """
    return torch.ops.softmix.mc_loss(pred, target, weight, bound, float(temperature), log_weights)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# torch.ops.softmix.mc_loss decomposes (in C++) into mc_loss_with_errors, which also returns
# the (M, B) per-sample errors, so the backward reads pred once instead of recomputing them.
# The fake kernel and the autograd formula (csrc/autograd.cpp) belong to that op.
# Fake kernels repeat the schema's defaults: the dispatcher may drop arguments left at them.
@torch.library.register_fake("softmix::mc_loss_with_errors")
def _(pred, target, weight, bound="jensen", temperature=1.0, log_weights=None):
    torch._check(pred.dim() >= 2, lambda: "mc_loss: pred must be (M, B, *S)")
    dtype = _loss_dtype(pred.dtype)
    return pred.new_empty((pred.shape[1],), dtype=dtype), pred.new_empty(pred.shape[:2], dtype=dtype)


@torch.library.register_fake("softmix::mc_loss_backward")
def _(grad_loss, pred, target, weight, errors, bound, temperature, need_grad_target, log_weights=None,
      need_grad_log_weights=False):
    grad_target = target.new_empty(target.shape if need_grad_target else (0,))
    # like errors: (M, B) in the loss dtype, which log_weights has
    grad_log_weights = errors.new_empty(errors.shape if need_grad_log_weights else (0,))
    return pred.new_empty(pred.shape), grad_target, weight.new_empty(weight.shape), grad_log_weights


# --------------------------------------------------------------------------------------
# denoise_step
# --------------------------------------------------------------------------------------


def denoise_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    noise: torch.Tensor | None = None,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One backward diffusion step, DDPM (``eta=1``) to DDIM (``eta=0``), fused.

    With ``a = alpha_bar_t[b]``, ``a' = alpha_bar_prev[b]`` per sample::

        x0     = from the prediction (epsilon | v_prediction | sample), clipped to
                 [-clip_sample, clip_sample] when given
        eps    = (x_t - sqrt(a) x0) / sqrt(1 - a)
        sigma  = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
        x_prev = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma * noise

    ``eta = 1`` is DDPM ancestral sampling with the "fixed_small" variance, ``eta = 0`` DDIM.
    Every sample may sit at its own step, so any respaced schedule works.

    Args:
        x_t: ``(B, *S)`` the current state.
        model_output: ``(B, *S)`` the denoiser's prediction, same dtype as ``x_t``.
        alpha_bar_t, alpha_bar_prev: ``(B,)`` cumulative alphas at this and the next step,
            ``0 < alpha_bar_t <= alpha_bar_prev <= 1``.
        noise: ``(B, *S)`` standard normal noise. When ``None`` and ``eta != 0`` the kernel
            draws it: this wrapper takes a 62-bit seed from ``generator`` (the default CPU
            generator when ``None``, so ``torch.manual_seed`` makes it reproducible) and the
            kernel makes value ``k``'s noise from Philox4x32-10 at ``(seed, k)`` with
            Box-Muller (``csrc/math/normal_noise.h``): the same numbers on CPU and CUDA up to
            rounding, whatever the thread count, without writing a noise tensor (float32
            values, cast to the dtype of ``x_t``). The raw
            ``torch.ops.softmix.denoise_step`` takes that ``seed`` as its last argument, and
            neither noise nor seed to mean "no noise" (the mean of the step): an op must be pure.
        eta: the DDIM ``eta``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        clip_sample: clip ``x0`` to ``[-clip_sample, clip_sample]``; ``None`` to not clip.

    Returns:
        ``(x_prev, x0_pred)``, both ``(B, *S)``. Differentiable in ``x_t``,
        ``model_output`` and ``noise``.
    """
    seed = None
    if noise is None and eta != 0:
        if torch.compiler.is_compiling():  # a seed read from a generator would break the graph
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
        else:
            seed = draw_seed(generator)
    return torch.ops.softmix.denoise_step(
        x_t,
        model_output,
        alpha_bar_t,
        alpha_bar_prev,
        noise,
        float(eta),
        prediction_type,
        None if clip_sample is None else float(clip_sample),
        seed,
    )


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed for noise drawn in a kernel: 62 random bits from ``generator`` (advancing it),
    or from the default CPU generator when ``None``."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


@torch.library.register_fake("softmix::denoise_step")
def _(x_t, model_output, alpha_bar_t, alpha_bar_prev, noise=None, eta=1.0, prediction_type="epsilon", clip_sample=None,
      seed=None):
    return x_t.new_empty(x_t.shape), x_t.new_empty(x_t.shape)


@torch.library.register_fake("softmix::denoise_step_backward")
def _(grad_x_prev, grad_x0, x_t, model_output, alpha_bar_t, alpha_bar_prev, eta, prediction_type, clip_sample,
      need_grad_noise):
    return x_t.new_empty(x_t.shape), x_t.new_empty(x_t.shape), x_t.new_empty(x_t.shape if need_grad_noise else (0,))
