"""mc_loss: the Monte Carlo SMD loss against float64 references and its bounds' textbook facts."""

import math

import pytest
import torch

from op_helpers import DEVICES, FLOAT_DTYPES, assert_close_to_reference, strided
from softmix import ops, reference

BOUNDS = ["jensen", "logmeanexp"]


def make_inputs(m, b, shape, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    pred = target + 0.7 * torch.randn(m, b, *shape, generator=g, dtype=torch.float64)
    weight = torch.rand(b, generator=g, dtype=torch.float64) * 2 + 0.1
    return pred.to(device), target.to(device), weight.to(device)


# M covers 1..16; S covers vectors, odd image shapes and a single value.
CASES = [(1, 5, (3,)), (2, 7, (2, 5, 5)), (4, 3, (3, 8, 8)), (7, 1, (33,)), (16, 4, (1,)), (3, 6, (1, 9, 7)), (5, 0, (4,))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("m,b,shape", CASES)
def test_values_and_gradients_match_float64_reference(device, bound, m, b, shape):
    pred64, target64, weight64 = make_inputs(m, b, shape, seed=m * 100 + b, device=device)
    temperature = 0.6
    grad_loss = torch.rand(b, dtype=torch.float64, device=device) + 0.5
    for dtype in FLOAT_DTYPES:
        pred, target = pred64.to(dtype), target64.to(dtype)
        weight = weight64 if dtype == torch.float64 else weight64.float()
        args64 = [t.detach().double().requires_grad_() for t in (pred, target, weight)]
        expected = reference.mc_loss(*args64, bound=bound, temperature=temperature)
        expected.backward(grad_loss)

        args = [t.detach().clone().requires_grad_() for t in (pred, target, weight)]
        loss = ops.mc_loss(*args, bound=bound, temperature=temperature)
        # the loss is accumulated and returned in float32 for half inputs
        assert loss.shape == (b,) and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        loss.backward(grad_loss.to(loss.dtype))
        assert_close_to_reference(loss, expected.detach(), dtype, f"loss ({dtype})")
        for name, arg, arg64 in zip(("pred", "target", "weight"), args, args64):
            assert arg.grad.dtype == arg.dtype and arg.grad.shape == arg.shape
            assert_close_to_reference(arg.grad, arg64.grad, dtype, f"grad {name} ({dtype})")


@pytest.mark.parametrize("bound", BOUNDS)
def test_non_contiguous_inputs_give_the_same_result(bound):
    pred, target, weight = make_inputs(3, 4, (5, 6), seed=2)
    expected = ops.mc_loss(pred, target, weight, bound)
    got = ops.mc_loss(strided(pred), strided(target), weight.repeat_interleave(2)[::2], bound)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bound", BOUNDS)
def test_gradcheck_float64(bound):
    pred, target, weight = make_inputs(3, 2, (2, 3), seed=9)
    args = [t.requires_grad_() for t in (pred, target, weight)]
    assert torch.autograd.gradcheck(lambda p, t, w: ops.mc_loss(p, t, w, bound, 0.8), args)


def test_logmeanexp_never_exceeds_jensen():
    # Jensen: -T log E exp(-x / T) <= E x, for any weights, temperatures and sample counts
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        m = int(torch.randint(1, 17, (1,), generator=g))
        pred, target, weight = make_inputs(m, 8, (3, 4), seed=seed)
        weight = weight * float(torch.rand(1, generator=g)) * 10
        temperature = float(torch.rand(1, generator=g)) * 5 + 0.05
        jensen = ops.mc_loss(pred, target, weight, "jensen")
        lme = ops.mc_loss(pred, target, weight, "logmeanexp", temperature)
        assert (lme <= jensen + 1e-12).all(), (seed, m, temperature)


def test_logmeanexp_equals_jensen_for_one_sample():
    pred, target, weight = make_inputs(1, 6, (2, 7), seed=11)
    for temperature in (0.1, 1.0, 7.0):
        torch.testing.assert_close(
            ops.mc_loss(pred, target, weight, "logmeanexp", temperature), ops.mc_loss(pred, target, weight, "jensen")
        )


def test_logmeanexp_tends_to_jensen_at_high_temperature_and_to_the_best_sample_at_low():
    pred, target, weight = make_inputs(6, 5, (4,), seed=12)
    errors = (pred - target).square().mean(-1)  # (M, B)
    jensen = ops.mc_loss(pred, target, weight, "jensen")
    hot = ops.mc_loss(pred, target, weight, "logmeanexp", 1e6)
    torch.testing.assert_close(hot, jensen, rtol=1e-5, atol=1e-8)
    # T -> 0: -T log mean exp(-w e / T) -> w min_m e_m (+ T log M)
    cold_t = 1e-4
    cold = ops.mc_loss(pred, target, weight, "logmeanexp", cold_t)
    best = weight * errors.min(0).values
    assert (cold - best).abs().max() <= cold_t * math.log(6) + 1e-9


def test_extreme_errors_stay_finite():
    # exp(-w e / T) underflows for every sample; the max-shifted logsumexp must not
    pred, target, weight = make_inputs(4, 3, (5,), seed=13)
    loss = ops.mc_loss(pred * 1e4, target, weight, "logmeanexp", 1e-3)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, reference.mc_loss(pred * 1e4, target, weight, "logmeanexp", 1e-3))
