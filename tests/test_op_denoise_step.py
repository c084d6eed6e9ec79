"""denoise_step: one DDPM / DDIM step, against float64 references, textbook formulas and
diffusers' own schedulers."""

import pytest
import torch

from op_helpers import DEVICES, FLOAT_DTYPES, assert_close_to_reference, strided
from softmix import ops, reference

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def linear_alphas_cumprod(steps=1000):
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def make_inputs(b, shape, seed, device="cpu"):
    """x_t, a prediction, noise, and a schedule position per sample (t and a step back)."""
    g = torch.Generator().manual_seed(seed)
    abar = linear_alphas_cumprod()
    t = torch.randint(1, 1000, (b,), generator=g)
    back = torch.randint(1, 50, (b,), generator=g)
    a_t, a_prev = abar[t], torch.where(t - back >= 0, abar[(t - back).clamp_min(0)], torch.ones(()))
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    model_output = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    return [u.to(device) for u in (x, model_output, a_t, a_prev, noise)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_values_and_gradients_match_float64_reference(device, prediction_type, clip, eta):
    x64, m64, a_t, a_prev, n64 = make_inputs(6, (3, 5, 7), seed=hash((prediction_type, clip, eta)) % 1000, device=device)
    grads = [torch.randn_like(x64), torch.randn_like(x64)]
    for dtype in FLOAT_DTYPES:
        x, m, n = x64.to(dtype), m64.to(dtype), n64.to(dtype)
        args64 = [u.detach().double().requires_grad_() for u in (x, m, n)]
        expected = reference.denoise_step(args64[0], args64[1], a_t, a_prev, args64[2], eta, prediction_type, clip)
        torch.autograd.backward(expected, grads)

        args = [u.detach().clone().requires_grad_() for u in (x, m, n)]
        got = ops.denoise_step(args[0], args[1], a_t.float(), a_prev.float(), args[2], eta, prediction_type, clip)
        torch.autograd.backward(got, [g_.to(dtype) for g_ in grads])
        # float32 alphas (as a schedule stores them) against float64 ones in the reference
        tol_dtype = dtype if dtype != torch.float64 else torch.float32
        for name, a, e in zip(("x_prev", "x0"), got, expected):
            assert a.dtype == dtype and a.shape == x.shape
            assert_close_to_reference(a, e.detach(), tol_dtype, f"{name} ({dtype})")
        for name, a, e in zip(("x_t", "model_output", "noise"), args, args64):
            assert_close_to_reference(a.grad, e.grad, tol_dtype, f"grad {name} ({dtype})")


def test_non_contiguous_inputs_give_the_same_result():
    x, m, a_t, a_prev, n = make_inputs(4, (3, 6), seed=1)
    expected = ops.denoise_step(x, m, a_t, a_prev, n, 0.7, "v_prediction", 2.0)
    got = ops.denoise_step(strided(x), strided(m), strided(a_t), a_prev, strided(n), 0.7, "v_prediction", 2.0)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [None, 1.5])
def test_gradcheck_float64(prediction_type, clip):
    x, m, a_t, a_prev, n = make_inputs(3, (4,), seed=5)
    # keep x0 off the clip boundary, where the gradient jumps
    x, m = x * 0.3, m * 0.3
    args = [u.requires_grad_() for u in (x, m, n)]
    assert torch.autograd.gradcheck(
        lambda x, m, n: ops.denoise_step(x, m, a_t, a_prev, n, 0.8, prediction_type, clip), args
    )


def test_eta_one_reproduces_ddpm_posterior_mean():
    # mean = sqrt(a') beta_t / (1 - a) x0 + sqrt(alpha_t) (1 - a') / (1 - a) x_t,
    # alpha_t = a / a', beta_t = 1 - alpha_t; the noise enters with the posterior std.
    x, m, a_t, a_prev, n = make_inputs(8, (5,), seed=6)
    x_prev, x0 = ops.denoise_step(x, m, a_t, a_prev, n, eta=1.0)
    a, ap = a_t[:, None], a_prev[:, None]
    alpha, beta = a / ap, 1 - a / ap
    x0_expected = (x - (1 - a).sqrt() * m) / a.sqrt()
    mean = ap.sqrt() * beta / (1 - a) * x0_expected + alpha.sqrt() * (1 - ap) / (1 - a) * x
    std = ((1 - ap) / (1 - a) * beta).sqrt()
    torch.testing.assert_close(x0, x0_expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_prev, mean + std * n, rtol=1e-9, atol=1e-9)


def test_eta_zero_is_deterministic_ddim():
    x, m, a_t, a_prev, n = make_inputs(5, (4, 3), seed=7)
    with_noise, _ = ops.denoise_step(x, m, a_t, a_prev, n, eta=0.0)
    without, _ = ops.denoise_step(x, m, a_t, a_prev, torch.zeros_like(n), eta=0.0)
    torch.testing.assert_close(with_noise, without, rtol=0, atol=0)
    # DDIM eq. 12: x_prev = sqrt(a') x0 + sqrt(1 - a') eps
    a, ap = a_t[:, None, None], a_prev[:, None, None]
    x0 = (x - (1 - a).sqrt() * m) / a.sqrt()
    torch.testing.assert_close(without, ap.sqrt() * x0 + (1 - ap).sqrt() * m, rtol=1e-9, atol=1e-9)


def test_wrapper_draws_its_noise_from_the_generator_and_the_raw_op_takes_none_as_the_mean():
    x, m, a_t, a_prev, _ = make_inputs(4, (6,), seed=8)
    first = ops.denoise_step(x, m, a_t, a_prev, generator=torch.Generator().manual_seed(3))[0]
    again = ops.denoise_step(x, m, a_t, a_prev, generator=torch.Generator().manual_seed(3))[0]
    other = ops.denoise_step(x, m, a_t, a_prev, generator=torch.Generator().manual_seed(4))[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    mean = torch.ops.softmix.denoise_step(x, m, a_t, a_prev, None, 1.0, "epsilon", None)[0]
    zero = ops.denoise_step(x, m, a_t, a_prev, torch.zeros_like(x))[0]
    torch.testing.assert_close(mean, zero, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# diffusers' schedulers, a different timestep per batch element
# --------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


def per_element_timesteps(scheduler, b, seed):
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(scheduler.timesteps), (b,), generator=g)
    t = scheduler.timesteps[picks]
    t[0] = scheduler.timesteps[-1]  # the final step, to x_0, is always covered
    return t


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("inference_steps", [None, 50])
def test_matches_diffusers_ddpm_scheduler_step(prediction_type, clip, inference_steps):
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, variance_type="fixed_small", prediction_type=prediction_type,
        clip_sample=clip is not None, clip_sample_range=clip or 1.0,
    )
    if inference_steps:
        scheduler.set_timesteps(inference_steps)
    b, shape = 6, (2, 4, 4)
    t = per_element_timesteps(scheduler, b, seed=inference_steps or 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    m = torch.randn(b, *shape, generator=g, dtype=torch.float64)

    expected, noise = [], []
    for i in range(b):
        out = scheduler.step(m[i : i + 1], int(t[i]), x[i : i + 1], generator=torch.Generator().manual_seed(100 + i))
        expected.append(out.prev_sample)
        # diffusers draws its noise with randn_tensor(shape, generator) on the CPU
        noise.append(torch.randn((1, *shape), generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64))
    prev_t = torch.stack([torch.as_tensor(scheduler.previous_timestep(int(ti))) for ti in t])
    abar = scheduler.alphas_cumprod.double()
    a_t = abar[t]
    a_prev = torch.where(prev_t >= 0, abar[prev_t.clamp_min(0)], torch.ones((), dtype=torch.float64))

    x_prev, _ = ops.denoise_step(x, m, a_t, a_prev, torch.cat(noise), 1.0, prediction_type, clip)
    # diffusers forms its step coefficients from float32 alphas: agreement is to float32 rounding
    assert_close_to_reference(x_prev, torch.cat(expected), torch.float32, "x_prev vs DDPMScheduler.step")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_matches_diffusers_ddim_scheduler_step(prediction_type, clip, eta):
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip is not None,
        clip_sample_range=clip or 1.0, set_alpha_to_one=True,
    )
    scheduler.set_timesteps(25)
    b, shape = 6, (3, 5)
    t = per_element_timesteps(scheduler, b, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    m = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(b, *shape, generator=g, dtype=torch.float64)

    # use_clipped_model_output: eps re-derived from the clipped x0, which is the op's meaning
    expected = torch.cat([
        scheduler.step(m[i : i + 1], int(t[i]), x[i : i + 1], eta=eta, use_clipped_model_output=True,
                       variance_noise=noise[i : i + 1]).prev_sample
        for i in range(b)
    ])
    prev_t = t - 1000 // 25
    abar = scheduler.alphas_cumprod.double()
    a_prev = torch.where(prev_t >= 0, abar[prev_t.clamp_min(0)], torch.as_tensor(scheduler.final_alpha_cumprod).double())
    x_prev, _ = ops.denoise_step(x, m, abar[t], a_prev, noise, eta, prediction_type, clip)
    assert_close_to_reference(x_prev, expected, torch.float32, "x_prev vs DDIMScheduler.step")
