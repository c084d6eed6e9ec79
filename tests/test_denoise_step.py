"""denoise_step: one backward diffusion step, DDPM (eta = 1) to DDIM (eta = 0).

DESIGN.md 3.3. With a = alpha_bar_t, a' = alpha_bar_prev per sample::

    x0     = from the prediction (epsilon | v_prediction | sample), clipped when asked
    eps    = (x_t - sqrt(a) x0) / sqrt(1 - a)
    sigma  = eta sqrt((1 - a') / (1 - a) (1 - a / a'))
    x_prev = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma noise

The fused op against softmix.reference in float64, gradcheck, the textbook facts (DDPM's
posterior mean, deterministic DDIM), diffusers' DDPMScheduler.step and DDIMScheduler.step with
a different timestep per batch element, and the errors bad input gets.
"""

import pytest
import torch

from conftest import (
    FLOAT_DTYPES,
    TOLERANCES,
    as_input,
    as_reference,
    assert_close_to_reference,
    at_odd_offset,
    non_contiguous,
    randn,
    uniform,
)
from softmix import ops, reference

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
NUM_TRAIN_TIMESTEPS = 1000


def linear_alphas_cumprod(steps=NUM_TRAIN_TIMESTEPS):
    """DDPM's linear schedule (beta from 1e-4 to 0.02), in float64."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, steps, dtype=torch.float64), 0)


def draw_schedule(rng, b):
    """(alpha_bar_t, alpha_bar_prev), each sample at its own step, with a jump of 1..49 steps.

    The first sample (when there is one) takes the last step, from t = 0 to alpha_bar = 1.
    """
    abar = linear_alphas_cumprod()
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=rng)
    prev = t - torch.randint(1, 50, (b,), generator=rng)
    if b:
        t[0], prev[0] = 0, -1
    a_prev = torch.where(prev >= 0, abar[prev.clamp_min(0)], torch.ones((), dtype=torch.float64))
    return abar[t], a_prev


def draw(rng, b, shape):
    """float64 x_t, model_output, noise (B, *S) and the per-sample schedule."""
    x, model_output, noise = randn(rng, b, *shape), randn(rng, b, *shape), randn(rng, b, *shape)
    a_t, a_prev = draw_schedule(rng, b)
    return x, model_output, noise, a_t, a_prev


def alpha_dtype(dtype):
    # a schedule stores its alphas in float32 (float64 beside float64 samples)
    return torch.float64 if dtype == torch.float64 else torch.float32


def off_clip_boundary(unclipped_x0, clip, margin=1e-3):
    """Where x0 (before clipping) is away from +-clip: the gradient jumps at the boundary."""
    if clip is None:
        return torch.ones_like(unclipped_x0, dtype=torch.bool)
    return (unclipped_x0.abs() - clip).abs() > margin * clip


def reference_with_grads(x, model_output, a_t, a_prev, noise, eta, prediction_type, clip, grads):
    args = [as_reference(t, requires_grad=True) for t in (x, model_output, noise)]
    out = reference.denoise_step(
        args[0], args[1], as_reference(a_t), as_reference(a_prev), args[2], eta, prediction_type, clip
    )
    torch.autograd.backward(out, [as_reference(g) for g in grads])
    return [o.detach() for o in out], [a.grad for a in args]


def check_step_against_reference(rng, device, dtype, b, shape, eta, prediction_type, clip, layout=None):
    x64, m64, n64, a_t64, a_prev64 = draw(rng, b, shape)
    x, m, noise = (as_input(t, dtype, device) for t in (x64, m64, n64))
    a_t, a_prev = (as_input(t, alpha_dtype(dtype), device) for t in (a_t64, a_prev64))
    if layout == "odd_offset":
        x, m, noise = (at_odd_offset(t) for t in (x, m, noise))
    elif layout is not None:
        x, m, noise, a_t = (non_contiguous(t, layout) for t in (x, m, noise, a_t))
    for t in (x, m, noise):
        t.requires_grad_()
    grads = [as_input(randn(rng, b, *shape), dtype, device) for _ in range(2)]

    x_prev, x0 = ops.denoise_step(x, m, a_t, a_prev, noise, eta, prediction_type, clip)
    for out in (x_prev, x0):
        assert out.dtype == dtype and out.shape == x.shape and out.device.type == device
    torch.autograd.backward((x_prev, x0), grads)

    (expected_prev, expected_x0), expected_grads = reference_with_grads(
        x, m, a_t, a_prev, noise, eta, prediction_type, clip, grads
    )
    assert_close_to_reference(x_prev, expected_prev, dtype, "x_prev")
    assert_close_to_reference(x0, expected_x0, dtype, "x0_pred")
    if clip is not None:
        assert (x0.detach().abs() <= clip).all()
    # the op is elementwise per sample: compare gradients where x0 is off the clip boundary
    unclipped_x0 = reference.denoise_step(*map(as_reference, (x, m, a_t, a_prev)), None, eta, prediction_type)[1]
    keep = off_clip_boundary(unclipped_x0, clip)
    assert keep.float().mean() > 0.9 or b == 0
    for name, arg, expected in zip(("x_t", "model_output", "noise"), (x, m, noise), expected_grads):
        assert arg.grad.dtype == dtype and arg.grad.shape == arg.shape, name
        assert_close_to_reference(arg.grad.cpu()[keep], expected[keep], dtype, f"grad {name}")


# B in {0, 1, 5, 7, 64}, S from none (B,) to odd images, and rows that split into the CUDA
# kernels' 16-byte packs (256 values).
SIZES = [(7, (2, 5, 5)), (1, (3,)), (64, (33,)), (5, ()), (0, (4, 4)), (3, (4, 8, 8))]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip1"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_values_and_gradients_match_float64_reference(rng, device, dtype, eta, clip, prediction_type):
    check_step_against_reference(rng, device, dtype, 7, (2, 5, 5), eta, prediction_type, clip)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B{s[0]}-S{'x'.join(map(str, s[1]))}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_batch_and_sample_shape_matches_float64_reference(rng, device, size, dtype):
    b, shape = size
    check_step_against_reference(rng, device, dtype, b, shape, 0.7, "v_prediction", 2.0)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_non_contiguous_inputs_match_float64_reference(rng, device, layout, prediction_type):
    check_step_against_reference(rng, device, torch.float32, 6, (3, 4, 5), 0.5, prediction_type, 1.5, layout)


def test_unaligned_contiguous_inputs_match_float64_reference(rng, device):
    # rows of 64 values (whole 16-byte packs) at an address that does not allow packs
    check_step_against_reference(rng, device, torch.float32, 5, (4, 4, 4), 0.5, "epsilon", 1.5, "odd_offset")


def prediction_for(x0, x_t, a_t, prediction_type):
    """The model output whose (unclipped) x0 is ``x0``, for each prediction type."""
    a = a_t.reshape(-1, *([1] * (x_t.dim() - 1)))
    if prediction_type == "epsilon":  # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    if prediction_type == "v_prediction":  # x0 = sqrt(a) x_t - sqrt(1 - a) v
        return (a.sqrt() * x_t - x0) / (1 - a).sqrt()
    return x0


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 1.5], ids=["no_clip", "clip1.5"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_gradcheck_float64(rng, eta, clip, prediction_type):
    x, _, noise, a_t, a_prev = draw(rng, 3, (4,))
    # keep away from the last step (a' = 1, sigma = 0) for a well-conditioned eps
    a_t = a_t.clamp(0.05, 0.95)
    a_prev = a_prev.clamp(0.05, 0.99).maximum(a_t)
    # x0 on both sides of the clip, at least 0.2 from it: gradcheck's finite differences
    # (1e-6) never cross the boundary, where the gradient jumps
    magnitude = torch.where(torch.arange(12).reshape(3, 4) % 2 == 0, uniform(rng, 3, 4, low=0, high=1.3),
                            uniform(rng, 3, 4, low=1.7, high=3))
    x0 = magnitude * torch.where(uniform(rng, 3, 4) < 0.5, -1.0, 1.0).double()
    m = prediction_for(x0, x, a_t, prediction_type)
    unclipped = reference.denoise_step(x, m, a_t, a_prev, None, eta, prediction_type)[1]
    assert_close_to_reference(unclipped, x0, torch.float64, "designed x0")
    args = (x.requires_grad_(), m.requires_grad_(), noise.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda x, m, n: ops.denoise_step(x, m, a_t, a_prev, n, eta, prediction_type, clip), args
    )


@pytest.mark.parametrize("wrt", ["x_t", "model_output", "noise"])
def test_gradcheck_float64_one_input_at_a_time(rng, wrt):
    x, m, noise, a_t, a_prev = draw(rng, 4, (3,))
    args = dict(x_t=x, model_output=m, noise=noise)
    args[wrt].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, m, n: ops.denoise_step(x, m, a_t, a_prev, n, 0.6, "epsilon", None), tuple(args.values())
    )


def test_empty_batch_gives_empty_outputs_and_gradients(device):
    x, m, noise = (torch.randn(0, 3, 4, device=device, requires_grad=True) for _ in range(3))
    a = torch.empty(0, device=device)
    x_prev, x0 = ops.denoise_step(x, m, a, a, noise, 1.0, "epsilon", 1.0)
    assert x_prev.shape == x0.shape == (0, 3, 4)
    (x_prev.sum() + x0.sum()).backward()
    assert x.grad.shape == m.grad.shape == noise.grad.shape == (0, 3, 4)


# --------------------------------------------------------------------------------------
# textbook facts
# --------------------------------------------------------------------------------------


def test_eta_one_reproduces_ddpm_posterior_mean(rng, device):
    # DDPM eq. 7: mean = sqrt(a') beta_t / (1 - a) x0 + sqrt(alpha_t) (1 - a') / (1 - a) x_t,
    # alpha_t = a / a', beta_t = 1 - alpha_t; variance beta~_t = (1 - a') / (1 - a) beta_t
    x, m, noise, a_t, a_prev = (as_input(t, torch.float64, device) for t in draw(rng, 9, (6,)))
    for prediction_type in PREDICTION_TYPES:
        x_prev, x0 = ops.denoise_step(x, m, a_t, a_prev, noise, 1.0, prediction_type)
        a, ap = a_t[:, None], a_prev[:, None]
        alpha, beta = a / ap, 1 - a / ap
        mean = ap.sqrt() * beta / (1 - a) * x0 + alpha.sqrt() * (1 - ap) / (1 - a) * x
        std = ((1 - ap) / (1 - a) * beta).sqrt()
        assert_close_to_reference(x_prev, mean + std * noise, torch.float64, f"x_prev ({prediction_type})")
        mean_only, _ = ops.denoise_step(x, m, a_t, a_prev, torch.zeros_like(noise), 1.0, prediction_type)
        assert_close_to_reference(mean_only, mean, torch.float64, f"posterior mean ({prediction_type})")


def test_eta_zero_is_deterministic_ddim(rng, device):
    x, m, noise, a_t, a_prev = (as_input(t, torch.float64, device) for t in draw(rng, 8, (4, 3)))
    with_noise, _ = ops.denoise_step(x, m, a_t, a_prev, noise, eta=0.0)
    other_noise, _ = ops.denoise_step(x, m, a_t, a_prev, 3 * noise + 1, eta=0.0)
    no_noise = torch.ops.softmix.denoise_step(x, m, a_t, a_prev, None, 0.0, "epsilon", None)[0]
    assert torch.equal(with_noise, other_noise)
    assert_close_to_reference(no_noise, with_noise, torch.float64, "noise=None")
    # DDIM eq. 12 with sigma = 0: x_prev = sqrt(a') x0 + sqrt(1 - a') eps
    a, ap = a_t[:, None, None], a_prev[:, None, None]
    x0 = (x - (1 - a).sqrt() * m) / a.sqrt()
    assert_close_to_reference(with_noise, ap.sqrt() * x0 + (1 - ap).sqrt() * m, torch.float64, "x_prev")


def test_noise_enters_with_the_ddim_sigma(rng, device):
    # x_prev(noise) - x_prev(0) = sigma noise, sigma = eta sqrt((1 - a') / (1 - a) (1 - a / a'))
    x, m, noise, a_t, a_prev = (as_input(t, torch.float64, device) for t in draw(rng, 10, (5,)))
    for eta in (0.3, 1.0, 2.0):
        with_noise, _ = ops.denoise_step(x, m, a_t, a_prev, noise, eta)
        without, _ = ops.denoise_step(x, m, a_t, a_prev, torch.zeros_like(noise), eta)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        assert_close_to_reference(with_noise - without, sigma[:, None] * noise, torch.float64, f"eta={eta}")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_perfect_prediction_recovers_x0_and_ddim_stays_on_the_forward_process(rng, device, prediction_type):
    # x_t = sqrt(a) x0 + sqrt(1 - a) eps; the exact eps, v or x0 gives back x0, and the DDIM
    # step lands on sqrt(a') x0 + sqrt(1 - a') eps, the forward process at the previous step
    x0, eps, _, a_t, a_prev = (as_input(t, torch.float64, device) for t in draw(rng, 12, (3, 2)))
    a, ap = a_t[:, None, None], a_prev[:, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    prediction = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    x_prev, x0_pred = ops.denoise_step(x_t, prediction, a_t, a_prev, None, 0.0, prediction_type)
    # epsilon prediction divides by sqrt(a) (down to 6e-3 at t = 999): allow for the amplification
    assert_close_to_reference(x0_pred, x0, torch.float32, "x0_pred")
    assert_close_to_reference(x_prev, ap.sqrt() * x0 + (1 - ap).sqrt() * eps, torch.float32, "x_prev")


def test_clipping_bounds_x0_and_changes_nothing_inside_the_range(rng, device):
    # the step is elementwise: elements whose x0 lies inside the range are untouched
    x, m, noise, a_t, a_prev = (as_input(t, torch.float64, device) for t in draw(rng, 16, (8,)))
    unclipped = ops.denoise_step(x, m, a_t, a_prev, noise, 0.5, "v_prediction")
    clipped = ops.denoise_step(x, m, a_t, a_prev, noise, 0.5, "v_prediction", clip_sample=0.8)
    inside = unclipped[1].abs() <= 0.8
    assert inside.any() and not inside.all()
    assert (clipped[1].abs() <= 0.8).all()
    assert_close_to_reference(clipped[1], unclipped[1].clamp(-0.8, 0.8), torch.float64, "x0_pred")
    for got, expected in zip(clipped, unclipped):
        assert_close_to_reference(got[inside], expected[inside], torch.float64, "inside the range")
        assert not torch.allclose(got[~inside], expected[~inside])
    huge = ops.denoise_step(x, m, a_t, a_prev, noise, 0.5, "v_prediction", clip_sample=1e9)
    for got, expected in zip(huge, unclipped):
        assert_close_to_reference(got, expected, torch.float64, "clip_sample=1e9")


def test_the_last_step_returns_x0(rng, device):
    # alpha_bar_prev = 1: x_prev = x0 whatever eta and the noise
    x, m, noise, a_t, _ = (as_input(t, torch.float64, device) for t in draw(rng, 6, (5,)))
    for eta in (0.0, 1.0):
        x_prev, x0 = ops.denoise_step(x, m, a_t, torch.ones_like(a_t), noise, eta, "epsilon", 1.0)
        assert_close_to_reference(x_prev, x0, torch.float64, f"eta={eta}")


# --------------------------------------------------------------------------------------
# diffusers' schedulers, a different timestep per batch element
# --------------------------------------------------------------------------------------

# The reference is checked too: it is what every other test here trusts.
IMPLEMENTATIONS = {"op": ops.denoise_step, "reference": reference.denoise_step}


def float64_scheduler(scheduler):
    """The scheduler with its alphas in float64, so it steps float64 samples to float64 rounding."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM's alpha_bar below step 0
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    return scheduler


def diffusers_tolerance(dtype):
    """float64: both sides exact to rounding. float32: diffusers forms its coefficients in
    float32 too, along another route (the posterior-mean form); at the first steps, where
    1 - a / a' ~ 1e-4, each route loses a digit or two to cancellation."""
    return TOLERANCES[torch.float64][0] if dtype == torch.float64 else 1e-4


def per_element_timesteps(rng, scheduler, b):
    """b of the scheduler's timesteps, the final one (to t = 0 or the last) always among them."""
    t = scheduler.timesteps[torch.randint(0, len(scheduler.timesteps), (b,), generator=rng)]
    t[0] = scheduler.timesteps[-1]
    t[1] = scheduler.timesteps[0]
    return t


def schedule_for(scheduler, t, prev_t, final_alpha):
    """alpha_bar_t and alpha_bar_prev per element, as the scheduler reads them."""
    abar = scheduler.alphas_cumprod
    a_prev = torch.where(prev_t >= 0, abar[prev_t.clamp_min(0)], torch.as_tensor(final_alpha, dtype=abar.dtype))
    return abar[t], a_prev


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("inference_steps", [None, 50], ids=["all_1000_steps", "50_steps"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip1"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reproduces_diffusers_ddpm_scheduler_step(rng, dtype, prediction_type, clip, inference_steps, implementation):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="linear",
        variance_type="fixed_small",
        prediction_type=prediction_type,
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
    )
    if inference_steps:
        scheduler.set_timesteps(inference_steps)
    if dtype == torch.float64:
        float64_scheduler(scheduler)
    b, shape = 8, (2, 4, 3)
    t = per_element_timesteps(rng, scheduler, b)
    assert (t == 0).any() and (t > 0).any()
    x, m = randn(rng, b, *shape).to(dtype), randn(rng, b, *shape).to(dtype)

    expected, noise = [], []
    for i in range(b):
        seed = int(torch.randint(0, 2**31, (), generator=rng))
        out = scheduler.step(m[i : i + 1], int(t[i]), x[i : i + 1], generator=torch.Generator().manual_seed(seed))
        expected.append(out.prev_sample)
        # DDPMScheduler.step draws randn_tensor(model_output.shape, generator=generator,
        # dtype=model_output.dtype) on the CPU, and only for t > 0; the same draw here
        noise.append(torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype))
    expected = torch.cat(expected)

    # prev = t - T / num_inference_steps (t - 1 without set_timesteps), alpha_bar 1 below 0
    prev_t = t - (NUM_TRAIN_TIMESTEPS // inference_steps if inference_steps else 1)
    assert all(max(int(p), -1) == int(scheduler.previous_timestep(int(ti))) for p, ti in zip(prev_t, t))
    a_t, a_prev = schedule_for(scheduler, t, prev_t, 1.0)
    x_prev, _ = IMPLEMENTATIONS[implementation](x, m, a_t, a_prev, torch.cat(noise), 1.0, prediction_type, clip)
    assert_close_to_reference(
        x_prev, expected.double(), dtype, "x_prev vs DDPMScheduler.step", diffusers_tolerance(dtype)
    )
    # the noise mattered: without it the steps with t > 0 differ
    mean, _ = IMPLEMENTATIONS[implementation](x, m, a_t, a_prev, None, 1.0, prediction_type, clip)
    assert not torch.allclose(mean[t > 0], expected[t > 0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip1"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reproduces_diffusers_ddim_scheduler_step(
    rng, dtype, prediction_type, clip, eta, set_alpha_to_one, implementation
):
    diffusers = pytest.importorskip("diffusers")
    inference_steps = 25
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
        set_alpha_to_one=set_alpha_to_one,
    )
    scheduler.set_timesteps(inference_steps)
    if dtype == torch.float64:
        float64_scheduler(scheduler)
    b, shape = 8, (3, 5)
    t = per_element_timesteps(rng, scheduler, b)
    x, m, noise = (randn(rng, b, *shape).to(dtype) for _ in range(3))

    # use_clipped_model_output: eps re-derived from the clipped x0, the op's meaning
    expected = torch.cat([
        scheduler.step(
            m[i : i + 1], int(t[i]), x[i : i + 1], eta=eta, use_clipped_model_output=True,
            variance_noise=noise[i : i + 1],
        ).prev_sample
        for i in range(b)
    ])
    prev_t = t - NUM_TRAIN_TIMESTEPS // inference_steps
    assert (prev_t < 0).any()
    a_t, a_prev = schedule_for(scheduler, t, prev_t, scheduler.final_alpha_cumprod)
    x_prev, _ = IMPLEMENTATIONS[implementation](x, m, a_t, a_prev, noise, eta, prediction_type, clip)
    assert_close_to_reference(
        x_prev, expected.double(), dtype, "x_prev vs DDIMScheduler.step", diffusers_tolerance(dtype)
    )


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_x0_pred_is_diffusers_pred_original_sample(rng, prediction_type):
    diffusers = pytest.importorskip("diffusers")
    scheduler = float64_scheduler(
        diffusers.DDPMScheduler(prediction_type=prediction_type, clip_sample=True, clip_sample_range=1.5)
    )
    b = 6
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=rng)
    x, m = randn(rng, b, 7), randn(rng, b, 7)
    expected = torch.cat([
        scheduler.step(m[i : i + 1], int(t[i]), x[i : i + 1], generator=torch.Generator()).pred_original_sample
        for i in range(b)
    ])
    a_t, a_prev = schedule_for(scheduler, t, t - 1, 1.0)
    _, x0 = ops.denoise_step(x, m, a_t, a_prev, None, 1.0, prediction_type, 1.5)
    assert_close_to_reference(x0, expected, torch.float64, "x0_pred vs pred_original_sample")


# --------------------------------------------------------------------------------------
# bad input: a Python exception naming the op, the argument and the shapes
# --------------------------------------------------------------------------------------


def good(b=4):
    x, m, noise = torch.randn(b, 3, 4), torch.randn(b, 3, 4), torch.randn(b, 3, 4)
    a_t = torch.rand(b) * 0.5 + 0.2
    return x, m, a_t, a_t + 0.1, noise


X, M, A, AP, N = good()
ONES = torch.ones(4)


def alphas(*values):
    return torch.tensor(values)


# (args, kwargs, what the message must say after "denoise_step")
BAD_INPUTS = {
    "x_t of rank 0": ((torch.tensor(1.0), torch.tensor(1.0), A[:1], AP[:1], None), {}, r"\bx_t\b"),
    "model_output of another rank": ((X, M.reshape(4, 12), A, AP, N), {}, r"\bmodel_output\b.*\[4, 3, 4\].*\[4, 12\]"),
    "model_output of another shape": ((X, M[:, :2], A, AP, N), {}, r"\bmodel_output\b.*\[4, 2, 4\]"),
    "alpha_bar_t of the wrong length": ((X, M, A[:3], AP, N), {}, r"\balpha_bar_t\b.*\(4,\).*\[3\]"),
    "alpha_bar_t of rank 0": ((X, M, A[0], AP, N), {}, r"\balpha_bar_t\b.*\(4,\)"),
    "alpha_bar_prev of the wrong length": ((X, M, A, torch.rand(5), N), {}, r"\balpha_bar_prev\b.*\[5\]"),
    "alpha_bar_prev of rank 2": ((X, M, A, AP[:, None], N), {}, r"\balpha_bar_prev\b.*\[4, 1\]"),
    "noise of another shape": ((X, M, A, AP, N[:2]), {}, r"\bnoise\b.*\[4, 3, 4\].*\[2, 3, 4\]"),
    "integer x_t": ((X.long(), M.long(), A, AP, N), {}, r"\bx_t\b.*Long"),
    "integer model_output": ((X, M.int(), A, AP, N), {}, r"\bmodel_output\b.*Int"),
    "integer alpha_bar_t": ((X, M, ONES.long(), AP, N), {}, r"\balpha_bar_t\b.*Long"),
    "model_output of another float dtype": ((X, M.double(), A, AP, N), {}, r"\bmodel_output\b.*Double"),
    "noise of another float dtype": ((X, M, A, AP, N.half()), {}, r"\bnoise\b.*Half"),
    "unknown prediction_type": ((X, M, A, AP, N), dict(prediction_type="eps"), r"\bprediction_type\b.*'eps'"),
    "alpha_bar_t of 0": ((X, M, alphas(0.5, 0.0, 0.3, 0.2), ONES, N), {}, r"\balpha_bar_t\b"),
    "alpha_bar_t above 1": ((X, M, alphas(0.5, 1.5, 0.3, 0.2), 2 * ONES, N), {}, r"\balpha_bar_t\b"),
    "alpha_bar_t negative": ((X, M, alphas(0.5, -0.1, 0.3, 0.2), ONES, N), {}, r"\balpha_bar_t\b"),
    "alpha_bar_t nan": ((X, M, alphas(0.5, float("nan"), 0.3, 0.2), ONES, N), {}, r"\balpha_bar_t\b"),
    "alpha_bar_prev above 1": ((X, M, A, alphas(1.0, 1.2, 1.0, 1.0), N), {}, r"\balpha_bar_prev\b"),
    "alpha_bar_prev below alpha_bar_t": ((X, M, A, A - 0.1, N), {}, r"\balpha_bar_prev\b"),
    "negative eta": ((X, M, A, AP, N), dict(eta=-0.5), r"\beta\b"),
    "zero clip_sample": ((X, M, A, AP, N), dict(clip_sample=0.0), r"\bclip_sample\b"),
    "negative clip_sample": ((X, M, A, AP, N), dict(clip_sample=-1.0), r"\bclip_sample\b"),
}


@pytest.mark.parametrize("args,kwargs,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_an_error_naming_the_argument(args, kwargs, message):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=r"denoise_step.*" + message):
        ops.denoise_step(*args, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("left_on_cpu", ["x_t", "model_output", "alpha_bar_t", "alpha_bar_prev", "noise"])
def test_mixed_devices_are_rejected(left_on_cpu):
    args = dict(zip(("x_t", "model_output", "alpha_bar_t", "alpha_bar_prev", "noise"), good()))
    for name in args:
        if name != left_on_cpu:
            args[name] = args[name].cuda()
    with pytest.raises(RuntimeError, match=r"denoise_step.*device"):
        ops.denoise_step(*args.values())


@pytest.mark.cuda
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_cuda_agrees_with_cpu(rng, prediction_type):
    x, m, noise, a_t, a_prev = (t.float() for t in draw(rng, 32, (3, 16, 16)))
    cpu = ops.denoise_step(x, m, a_t, a_prev, noise, 0.5, prediction_type, 1.0)
    gpu = ops.denoise_step(*(t.cuda() for t in (x, m, a_t, a_prev, noise)), 0.5, prediction_type, 1.0)
    for name, g, c in zip(("x_prev", "x0_pred"), gpu, cpu):
        assert_close_to_reference(g, c.double(), torch.float32, f"{name} cuda vs cpu")
