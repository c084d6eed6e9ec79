"""mc_loss: the Monte Carlo SMD loss over M samples of the latent, one value per example.

DESIGN.md 3.2. With ``e[m, b] = mean_S (pred[m, b] - target[b])^2``, ``"jensen"`` is
``w_b mean_m e[m, b]`` (the paper's bound) and ``"logmeanexp"`` is
``-T log mean_m exp(-w_b e[m, b] / T)`` (the tighter importance-weighted bound). With
``log_weights`` ``lw = log pi`` (a finite mixture's weights) the means over m are sums
weighted by ``pi``. The fused op against softmix.reference in float64, gradcheck, the bounds'
textbook facts, bad input.
"""

import math

import pytest
import torch

from conftest import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    as_input,
    as_reference,
    assert_close_to_reference,
    at_odd_offset,
    non_contiguous,
    randn,
    uniform,
)
from softmix import ops, reference

BOUNDS = ["jensen", "logmeanexp"]


def draw(rng, m, b, shape, spread=0.7):
    """float64 pred (M, B, *S) scattered around target (B, *S), and positive weight (B,)."""
    target = randn(rng, b, *shape)
    pred = target + spread * randn(rng, m, b, *shape)
    weight = uniform(rng, b, low=0.1, high=2.0)
    return pred, target, weight


def draw_log_weights(rng, m, b):
    """float64 log pi (M, B), normalised over m, far from uniform (pi from about 1e-4 to 1)."""
    return torch.log_softmax(2 * randn(rng, m, b), dim=0)


MIXTURES = ["uniform", "log_weights"]  # without log_weights (1/M each), or with drawn ones
INPUT_NAMES = ("pred", "target", "weight", "log_weights")


def loss_dtype(dtype):
    # the loss is accumulated in float and returned in float32 for half inputs (ops.mc_loss docs)
    return torch.float32 if dtype in HALF_DTYPES else dtype


def weight_dtype(dtype):
    # a schedule's weights are float32 beside half predictions, float64 beside float64 ones
    return loss_dtype(dtype)


def fused_loss(inputs, bound, temperature):
    """ops.mc_loss of inputs (pred, target, weight) or (pred, target, weight, log_weights)."""
    return ops.mc_loss(*inputs[:3], bound, temperature, log_weights=inputs[3] if len(inputs) > 3 else None)


def reference_with_grads(inputs, grad_loss, bound, temperature):
    """The float64 reference's loss and gradients for the same inputs as fused_loss."""
    args = [as_reference(t, requires_grad=True) for t in inputs]
    loss = reference.mc_loss(*args[:3], bound, temperature, *args[3:])
    loss.backward(as_reference(grad_loss))
    return loss.detach(), [a.grad for a in args]


# M in 1..16 (1, 2, 3, 4, 5, 7, 8, 16: the CPU backward has a loop for each of 1, 2, 4, 8, 16
# and one for any other M), B in {0, 1, 7, ...}, S from one value to odd images.
SIZES = [
    # M,  B, S
    (1, 7, (3,)),
    (2, 1, (2, 5, 5)),
    (3, 7, (1,)),
    (4, 5, (3, 8, 8)),
    (5, 3, (33,)),
    (7, 2, (1, 9, 7)),
    (8, 3, (5, 7)),
    (16, 4, (2, 3)),
    (4, 128, (4, 4)),
    (2, 3, (3, 64, 64)),  # long rows: 12288 values accumulated per example
    (3, 0, (4,)),
]


@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bound,temperature", [("jensen", 1.0), ("logmeanexp", 1.0), ("logmeanexp", 0.3)])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"M{s[0]}-B{s[1]}-S{'x'.join(map(str, s[2]))}")
def test_values_and_gradients_match_float64_reference(rng, device, dtype, bound, temperature, size, mixture):
    m, b, shape = size
    pred64, target64, weight64 = draw(rng, m, b, shape)
    inputs = [as_input(pred64, dtype, device, True), as_input(target64, dtype, device, True),
              as_input(weight64, weight_dtype(dtype), device, True)]
    if mixture == "log_weights":  # in the loss dtype, as the op asks
        inputs.append(as_input(draw_log_weights(rng, m, b), loss_dtype(dtype), device, True))
    grad_loss = as_input(uniform(rng, b, low=0.5, high=1.5), loss_dtype(dtype), device)

    loss = fused_loss(inputs, bound, temperature)
    assert loss.shape == (b,) and loss.dtype == loss_dtype(dtype) and loss.device.type == device
    loss.backward(grad_loss)

    expected, expected_grads = reference_with_grads(inputs, grad_loss, bound, temperature)
    assert_close_to_reference(loss, expected, dtype, "loss")
    for name, arg, grad in zip(INPUT_NAMES, inputs, expected_grads):
        assert arg.grad.dtype == arg.dtype and arg.grad.shape == arg.shape, name
        assert_close_to_reference(arg.grad, grad, dtype, f"grad {name}")


@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("layout", ["transposed", "strided", "sample_major"])
def test_non_contiguous_inputs_match_float64_reference(rng, device, bound, layout, mixture):
    dtype = torch.float32
    m, b, shape = 4, 6, (3, 5, 7)
    pred64, target64, weight64 = draw(rng, m, b, shape)
    log_weights64 = draw_log_weights(rng, m, b)
    if layout == "sample_major":
        # a model run once on the (B * M) fan-out: (B, M, *S) viewed as (M, B, *S), and the
        # mixture's log-weights (B, M) transposed, as training_loss hands them over
        pred = as_input(pred64.transpose(0, 1).contiguous(), dtype, device).transpose(0, 1)
        log_weights = as_input(log_weights64.T.contiguous(), dtype, device).T
        target, weight = as_input(target64, dtype, device), as_input(weight64, dtype, device)
    else:
        pred, target, weight, log_weights = (
            non_contiguous(as_input(t, dtype, device), layout) for t in (pred64, target64, weight64, log_weights64)
        )
    assert not pred.is_contiguous() and not log_weights.is_contiguous()
    inputs = [pred, target, weight] + ([log_weights] if mixture == "log_weights" else [])
    for t in inputs:
        t.requires_grad_()
    grad_loss = as_input(uniform(rng, b, low=0.5, high=1.5), dtype, device)

    loss = fused_loss(inputs, bound, 0.5)
    loss.backward(grad_loss)
    expected, expected_grads = reference_with_grads(inputs, grad_loss, bound, 0.5)
    assert_close_to_reference(loss, expected, dtype, "loss")
    for name, arg, grad in zip(INPUT_NAMES, inputs, expected_grads):
        assert_close_to_reference(arg.grad, grad, dtype, f"grad {name}")


@pytest.mark.parametrize("bound", BOUNDS)
def test_unaligned_contiguous_inputs_match_float64_reference(rng, device, bound):
    # rows of 2 x 24 x 24 values (several CUDA chunks, whole 16-byte packs) at an address
    # that does not allow packs
    pred64, target64, weight64 = draw(rng, 3, 5, (2, 24, 24))
    pred, target = (at_odd_offset(as_input(t, torch.float32, device)).requires_grad_() for t in (pred64, target64))
    weight = as_input(weight64, torch.float32, device, True)
    grad_loss = as_input(uniform(rng, 5, low=0.5, high=1.5), torch.float32, device)
    loss = fused_loss([pred, target, weight], bound, 0.5)
    loss.backward(grad_loss)
    expected, expected_grads = reference_with_grads([pred, target, weight], grad_loss, bound, 0.5)
    assert_close_to_reference(loss, expected, torch.float32, "loss")
    for name, arg, grad in zip(INPUT_NAMES, (pred, target, weight), expected_grads):
        assert_close_to_reference(arg.grad, grad, torch.float32, f"grad {name}")


@pytest.mark.parametrize("bound,temperature", [("jensen", 1.0), ("logmeanexp", 1.0), ("logmeanexp", 0.25)])
def test_gradcheck_float64(rng, bound, temperature):
    pred, target, weight = (t.requires_grad_() for t in draw(rng, 3, 2, (2, 3)))
    assert torch.autograd.gradcheck(lambda p, t, w: ops.mc_loss(p, t, w, bound, temperature), (pred, target, weight))


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("wrt", ["pred", "target", "weight"])
def test_gradcheck_float64_one_input_at_a_time(rng, bound, wrt):
    args = dict(zip(("pred", "target", "weight"), draw(rng, 4, 3, (5,))))
    args[wrt].requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t, w: ops.mc_loss(p, t, w, bound, 0.7), tuple(args.values()))


@pytest.mark.parametrize("bound,temperature", [("jensen", 1.0), ("logmeanexp", 1.0), ("logmeanexp", 0.25)])
def test_gradcheck_float64_with_log_weights(rng, bound, temperature):
    # gradcheck moves log_weights off the simplex: the op does not renormalise, so this checks
    # the unconstrained gradient, the one autograd passes on to log_softmax
    pred, target, weight = (t.requires_grad_() for t in draw(rng, 3, 2, (2, 3)))
    log_weights = draw_log_weights(rng, 3, 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, t, w, lw: ops.mc_loss(p, t, w, bound, temperature, log_weights=lw),
        (pred, target, weight, log_weights),
    )


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("wrt", INPUT_NAMES)
def test_gradcheck_float64_with_log_weights_one_input_at_a_time(rng, bound, wrt):
    # each gradient alone: the backward then skips the others (need_grad_target, ...)
    args = dict(zip(INPUT_NAMES, (*draw(rng, 4, 3, (5,)), draw_log_weights(rng, 4, 3))))
    args[wrt].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, t, w, lw: ops.mc_loss(p, t, w, bound, 0.7, log_weights=lw), tuple(args.values())
    )


@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("bound", BOUNDS)
def test_empty_batch_gives_empty_loss_and_gradients(rng, device, bound, mixture):
    inputs = [as_input(t, torch.float32, device, True) for t in draw(rng, 3, 0, (4, 2))]
    if mixture == "log_weights":
        inputs.append(as_input(draw_log_weights(rng, 3, 0), torch.float32, device, True))
    loss = fused_loss(inputs, bound, 1.0)
    assert loss.shape == (0,)
    loss.sum().backward()
    for arg in inputs:
        assert arg.grad.shape == arg.shape


@pytest.mark.parametrize("bound", BOUNDS)
def test_one_value_per_example_matches_float64_reference(rng, bound):
    # S = (): pred (M, B), target (B,), e[m, b] is the single squared difference
    pred, target, weight = draw(rng, 5, 7, ())
    got = ops.mc_loss(pred, target, weight, bound, 0.5)
    assert_close_to_reference(got, reference.mc_loss(pred, target, weight, bound, 0.5), torch.float64, "loss")


def test_one_value_per_example_is_the_squared_difference(rng, device):
    # the same S = () case against the formula written out
    pred, target, weight = (as_input(t, torch.float64, device) for t in draw(rng, 5, 7, ()))
    errors = (pred - target).square()
    expected_jensen = weight * errors.mean(0)
    expected_lme = -0.5 * (torch.logsumexp(-weight * errors / 0.5, 0) - math.log(5))
    assert_close_to_reference(ops.mc_loss(pred, target, weight, "jensen"), expected_jensen, torch.float64, "jensen")
    assert_close_to_reference(ops.mc_loss(pred, target, weight, "logmeanexp", 0.5), expected_lme, torch.float64, "lme")


# --------------------------------------------------------------------------------------
# the two bounds
# --------------------------------------------------------------------------------------


def rounding_slack(pred, target, weight, temperature, accumulate_dtype, log_weights=None):
    """How far rounding alone may push the computed logmeanexp above jensen, per example.

    ``-T logsumexp(x)`` with ``x = lw - w e / T`` (``lw = -log M`` without log-weights) loses
    ``~eps (|x|_max + |lw|_max)`` to rounding inside the log, which the factor T turns into
    ``eps (w e_max + T |lw|_max)``: at a high temperature the gap Jensen's inequality leaves
    (``~ w^2 Var e / 2T``) drops below it.
    """
    errors = (as_reference(pred) - as_reference(target)).square().flatten(2).mean(-1)  # (M, B)
    log_term = math.log(pred.shape[0]) if log_weights is None else as_reference(log_weights).abs().max(0).values
    scale = as_reference(weight) * errors.max(0).values + temperature * (log_term + 1)
    return 8 * torch.finfo(accumulate_dtype).eps * scale.to(pred.device)


def test_logmeanexp_never_exceeds_jensen(rng, device):
    # Jensen's inequality: -T log E exp(-x / T) <= E x, for any weights, temperatures and M
    for _ in range(100):
        m = int(torch.randint(1, 17, (), generator=rng))
        b = int(torch.randint(1, 9, (), generator=rng))
        spread = float(uniform(rng, 1, low=0.01, high=3.0))
        pred, target, weight = (as_input(t, torch.float64, device) for t in draw(rng, m, b, (3, 4), spread))
        weight = weight * float(10 ** uniform(rng, 1, low=-3, high=3))
        temperature = float(10 ** uniform(rng, 1, low=-3, high=3))
        jensen = ops.mc_loss(pred, target, weight, "jensen")
        lme = ops.mc_loss(pred, target, weight, "logmeanexp", temperature)
        assert torch.isfinite(lme).all()
        slack = rounding_slack(pred, target, weight, temperature, torch.float64)
        assert (lme <= jensen + slack).all(), (m, temperature, lme - jensen, slack)


def test_weighted_logmeanexp_never_exceeds_weighted_jensen(rng, device):
    # Jensen's inequality holds for any weights pi: -T log sum pi exp(-x / T) <= sum pi x
    for _ in range(50):
        m = int(torch.randint(1, 17, (), generator=rng))
        b = int(torch.randint(1, 9, (), generator=rng))
        pred, target, weight = (as_input(t, torch.float64, device) for t in draw(rng, m, b, (3, 4)))
        log_weights = as_input(draw_log_weights(rng, m, b), torch.float64, device)
        temperature = float(10 ** uniform(rng, 1, low=-2, high=2))
        jensen = ops.mc_loss(pred, target, weight, "jensen", log_weights=log_weights)
        lme = ops.mc_loss(pred, target, weight, "logmeanexp", temperature, log_weights=log_weights)
        slack = rounding_slack(pred, target, weight, temperature, torch.float64, log_weights)
        assert (lme <= jensen + slack).all(), (m, temperature, lme - jensen, slack)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_logmeanexp_never_exceeds_jensen_in_low_precision(rng, device, dtype):
    for _ in range(20):
        m = int(torch.randint(2, 17, (), generator=rng))
        temperature = float(10 ** uniform(rng, 1, low=-2, high=2))
        pred, target, weight = draw(rng, m, 16, (5, 5))
        pred, target = as_input(pred, dtype, device), as_input(target, dtype, device)
        weight = as_input(weight, torch.float32, device)
        jensen = ops.mc_loss(pred, target, weight, "jensen")
        lme = ops.mc_loss(pred, target, weight, "logmeanexp", temperature)
        # both are accumulated in float: allow float32 rounding
        slack = rounding_slack(pred, target, weight, temperature, torch.float32)
        assert (lme <= jensen + slack).all(), (m, temperature, lme - jensen, slack)


@pytest.mark.parametrize("temperature", [1e-3, 0.1, 1.0, 7.0, 1e3])
def test_logmeanexp_equals_jensen_for_one_sample(rng, device, temperature):
    pred, target, weight = (as_input(t, torch.float64, device) for t in draw(rng, 1, 9, (2, 7)))
    assert_close_to_reference(
        ops.mc_loss(pred, target, weight, "logmeanexp", temperature),
        ops.mc_loss(pred, target, weight, "jensen"),
        torch.float64,
        f"logmeanexp at T={temperature} vs jensen, M=1",
    )


def test_logmeanexp_equals_jensen_when_every_sample_agrees(rng):
    # equality in Jensen's inequality holds exactly when the errors do not vary over m
    one, target, weight = draw(rng, 1, 6, (4,))
    pred = one.expand(5, *one.shape[1:])
    assert_close_to_reference(
        ops.mc_loss(pred, target, weight, "logmeanexp", 0.3), ops.mc_loss(pred, target, weight), torch.float64, "loss"
    )


def test_logmeanexp_is_strictly_tighter_when_samples_differ(rng):
    pred, target, weight = draw(rng, 6, 8, (10,), spread=1.0)
    gap = ops.mc_loss(pred, target, weight) - ops.mc_loss(pred, target, weight, "logmeanexp", 0.5)
    assert (gap > 1e-6).all()


def test_logmeanexp_tends_to_jensen_when_hot_and_to_the_best_sample_when_cold(rng):
    pred, target, weight = draw(rng, 6, 5, (4,))
    errors = (pred - target).square().mean(-1)  # (M, B)
    jensen = ops.mc_loss(pred, target, weight, "jensen")
    hot = ops.mc_loss(pred, target, weight, "logmeanexp", 1e6)
    assert_close_to_reference(hot, jensen, torch.float32, "T -> inf")
    # T -> 0: w min_m e_m <= loss <= w min_m e_m + T log M
    cold_t = 1e-4
    cold = ops.mc_loss(pred, target, weight, "logmeanexp", cold_t)
    best = weight * errors.min(0).values
    assert (cold >= best - 1e-12).all() and (cold <= best + cold_t * math.log(6) + 1e-12).all()


def test_jensen_is_the_weighted_mean_squared_error_over_samples_and_positions(rng):
    pred, target, weight = draw(rng, 3, 4, (2, 5))
    expected = weight * (pred - target).square().mean(dim=(0, 2, 3))
    assert_close_to_reference(ops.mc_loss(pred, target, weight), expected, torch.float64, "jensen")


def test_logmeanexp_gradient_weights_each_sample_by_its_posterior(rng):
    # d loss / d pred[m] = softmax_m(-w e / T) * w * d e[m] / d pred[m]: the best samples learn most
    pred, target, weight = draw(rng, 5, 3, (6,))
    pred.requires_grad_()
    ops.mc_loss(pred, target, weight, "logmeanexp", 0.4).sum().backward()
    errors = (pred.detach() - target).square().mean(-1)
    posterior = torch.softmax(-weight * errors / 0.4, dim=0)  # (M, B)
    expected = (posterior * weight)[..., None] * 2 * (pred.detach() - target) / 6
    assert_close_to_reference(pred.grad, expected, torch.float64, "grad pred")


# --------------------------------------------------------------------------------------
# log_weights: a finite mixture's weights pi
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bound,temperature", [("jensen", 1.0), ("logmeanexp", 0.5)])
def test_uniform_log_weights_give_the_unweighted_loss(rng, device, dtype, bound, temperature):
    # lw = -log M is what the op assumes without log_weights; equal up to exp(-log M) != 1/M
    m, b = 5, 7
    inputs = [as_input(t, dtype, device, True) for t in draw(rng, m, b, (3, 4))]
    log_weights = torch.full((m, b), -math.log(m), dtype=dtype, device=device)
    weighted = ops.mc_loss(*inputs, bound, temperature, log_weights=log_weights)
    plain = ops.mc_loss(*inputs, bound, temperature)
    tolerance = 8 * torch.finfo(dtype).eps
    assert_close_to_reference(weighted, plain, dtype, "loss", tolerance)
    for name, got, expected in zip(INPUT_NAMES, torch.autograd.grad(weighted.sum(), inputs),
                                   torch.autograd.grad(plain.sum(), inputs)):
        assert_close_to_reference(got, expected, dtype, f"grad {name}", tolerance)


@pytest.mark.parametrize("absent", [0, 2], ids=["first", "last"])
@pytest.mark.parametrize("bound", BOUNDS)
def test_a_component_of_weight_zero_counts_as_absent(rng, device, bound, absent):
    # lw = -inf: a finite loss, that of the other components alone, and zero gradients for the
    # component (never NaN), even where its prediction is perfect and would dominate logmeanexp
    m, b = 3, 6
    pred, target, weight = draw(rng, m, b, (5,))
    pred[absent] = target
    kept = [k for k in range(m) if k != absent]
    log_weights = torch.full((m, b), -math.inf, dtype=torch.float64)
    log_weights[kept] = draw_log_weights(rng, m - 1, b)
    inputs = [as_input(t, torch.float64, device, True) for t in (pred, target, weight, log_weights)]

    loss = fused_loss(inputs, bound, 0.5)
    loss.backward(torch.ones_like(loss))
    assert torch.isfinite(loss).all()
    for name, arg in zip(INPUT_NAMES, inputs):
        assert torch.isfinite(arg.grad).all(), name
    assert (inputs[0].grad[absent] == 0).all() and (inputs[3].grad[absent] == 0).all()
    pred, target, weight, log_weights = (t.detach() for t in inputs)
    without = ops.mc_loss(pred[kept], target, weight, bound, 0.5, log_weights=log_weights[kept])
    assert_close_to_reference(loss, without, torch.float64, "loss with a component of weight 0 vs without it")


@pytest.mark.parametrize("bound", BOUNDS)
def test_an_example_without_any_weight_has_the_bounds_value_and_zero_gradients(rng, device, bound):
    # every lw of example 1 is -inf: sum_m pi_m exp(-w e_m / T) = 0, so logmeanexp is +inf
    # (as the float64 reference's logsumexp gives), jensen 0; the gradients are 0, not NaN, and
    # the other examples are untouched
    m, b = 4, 3
    pred, target, weight = draw(rng, m, b, (5,))
    log_weights = draw_log_weights(rng, m, b)
    log_weights[:, 1] = -math.inf
    inputs = [as_input(t, torch.float64, device, True) for t in (pred, target, weight, log_weights)]
    loss = fused_loss(inputs, bound, 0.5)
    expected = reference.mc_loss(pred, target, weight, bound, 0.5, log_weights=log_weights)
    assert expected[1].item() == (math.inf if bound == "logmeanexp" else 0.0)
    assert_close_to_reference(loss, expected, torch.float64, "loss")
    probe = torch.rand(b, dtype=torch.float64)
    loss.backward(probe.to(loss.device))
    for name, arg in zip(INPUT_NAMES, inputs):
        assert torch.isfinite(arg.grad).all(), name
    assert (inputs[0].grad[:, 1] == 0).all() and (inputs[3].grad[:, 1] == 0).all() and inputs[2].grad[1] == 0
    kept = [0, 2]
    ref_inputs = [t[:, kept] if i in (0, 3) else t[kept] for i, t in enumerate((pred, target, weight, log_weights))]
    ref_inputs = [t.detach().clone().requires_grad_() for t in ref_inputs]
    reference.mc_loss(*ref_inputs[:3], bound, 0.5, log_weights=ref_inputs[3]).backward(probe[kept])
    assert_close_to_reference(inputs[0].grad[:, kept], ref_inputs[0].grad, torch.float64, "grad pred")
    assert_close_to_reference(inputs[3].grad[:, kept], ref_inputs[3].grad, torch.float64, "grad log_weights")


def test_logmeanexp_gradient_of_the_log_weights_is_minus_t_times_the_posterior(rng):
    # d loss / d lw_m = -T p_m with p = softmax_m(lw - w e / T): the mixture's weights move
    # towards the components that explain the target
    pred, target, weight = draw(rng, 4, 3, (6,))
    log_weights = draw_log_weights(rng, 4, 3).requires_grad_()
    ops.mc_loss(pred, target, weight, "logmeanexp", 0.4, log_weights=log_weights).sum().backward()
    errors = (pred - target).square().mean(-1)
    posterior = torch.softmax(log_weights.detach() - weight * errors / 0.4, dim=0)
    assert_close_to_reference(log_weights.grad, -0.4 * posterior, torch.float64, "grad log_weights")


def test_extreme_errors_stay_finite(rng, device):
    # exp(-w e / T) underflows for every sample: the max-shifted log-sum-exp must not
    pred, target, weight = (as_input(t, torch.float32, device) for t in draw(rng, 4, 3, (5,)))
    loss = ops.mc_loss(pred * 1e4, target, weight, "logmeanexp", 1e-3)
    assert torch.isfinite(loss).all()
    expected = reference.mc_loss(*(as_reference(t) for t in (pred * 1e4, target, weight)), "logmeanexp", 1e-3)
    assert_close_to_reference(loss, expected, torch.float32, "loss")


# --------------------------------------------------------------------------------------
# bad input: a Python exception naming the op, the argument and the shapes
# --------------------------------------------------------------------------------------


def good(m=3, b=4):
    return torch.randn(m, b, 2, 3), torch.randn(b, 2, 3), torch.rand(b) + 0.1


P, T, W = good()
BAD_INPUTS = {
    "pred of rank 1": ((torch.randn(4), torch.randn(4), W), {}, r"mc_loss.*\bpred\b.*\(M, B, \*S\).*\[4\]"),
    "target of another rank": ((P, torch.randn(4, 6), W), {}, r"mc_loss.*\btarget\b.*\[4, 2, 3\].*\[4, 6\]"),
    "target of another shape": ((P, torch.randn(4, 3, 2), W), {}, r"mc_loss.*\btarget\b.*\[4, 3, 2\]"),
    "target of another B": ((P, torch.randn(5, 2, 3), W), {}, r"mc_loss.*\btarget\b.*\[5, 2, 3\]"),
    "weight of the wrong length": ((P, T, torch.rand(5)), {}, r"mc_loss.*\bweight\b.*\(4,\).*\[5\]"),
    "weight of rank 2": ((P, T, torch.rand(4, 1)), {}, r"mc_loss.*\bweight\b.*\[4, 1\]"),
    "no samples": ((P[:0], T, W), {}, r"mc_loss.*\bpred\b.*\[0, 4, 2, 3\]"),
    "integer pred": ((P.long(), T.long(), W), {}, r"mc_loss.*\bpred\b.*Long"),
    "integer target": ((P, T.int(), W), {}, r"mc_loss.*\btarget\b.*Int"),
    "integer weight": ((P, T, torch.ones(4, dtype=torch.int32)), {}, r"mc_loss.*\bweight\b.*Int"),
    "target of another float dtype": ((P, T.half(), W), {}, r"mc_loss.*\btarget\b.*Half"),
    "unknown bound": ((P, T, W), dict(bound="tight"), r"mc_loss.*\bbound\b.*'tight'"),
    "zero temperature": ((P, T, W), dict(bound="logmeanexp", temperature=0.0), r"mc_loss.*\btemperature\b"),
    "negative temperature": ((P, T, W), dict(bound="logmeanexp", temperature=-1.0), r"mc_loss.*\btemperature\b"),
    "nan temperature": ((P, T, W), dict(bound="logmeanexp", temperature=math.nan), r"mc_loss.*\btemperature\b"),
    "log_weights (B, M)": (
        (P, T, W), dict(log_weights=torch.zeros(4, 3)), r"mc_loss.*\blog_weights\b.*\(M, B\) = \(3, 4\).*\[4, 3\]"
    ),
    "log_weights of another M": ((P, T, W), dict(log_weights=torch.zeros(2, 4)), r"mc_loss.*\blog_weights\b.*\[2, 4\]"),
    "log_weights of rank 1": ((P, T, W), dict(log_weights=torch.zeros(3)), r"mc_loss.*\blog_weights\b.*\[3\]"),
    "half log_weights": (
        (P, T, W), dict(log_weights=torch.zeros(3, 4, dtype=torch.float16)), r"mc_loss.*\blog_weights\b.*Float.*Half"
    ),
    "float64 log_weights beside float32 pred": (
        (P, T, W), dict(log_weights=torch.zeros(3, 4, dtype=torch.float64)), r"mc_loss.*\blog_weights\b.*Double"
    ),
    "integer log_weights": (
        (P, T, W), dict(log_weights=torch.zeros(3, 4, dtype=torch.long)), r"mc_loss.*\blog_weights\b.*Long"
    ),
}


@pytest.mark.parametrize("args,kwargs,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_an_error_naming_the_argument(args, kwargs, message):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        ops.mc_loss(*args, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("on_cuda", INPUT_NAMES)
def test_mixed_devices_are_rejected(on_cuda):
    args = dict(zip(INPUT_NAMES, (*good(), torch.full((3, 4), -math.log(3)))))
    args[on_cuda] = args[on_cuda].cuda()
    with pytest.raises(RuntimeError, match=rf"mc_loss.*device.*\b{on_cuda}\b"):
        fused_loss(list(args.values()), "jensen", 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("bound", BOUNDS)
def test_cuda_agrees_with_cpu(rng, bound, mixture):
    m, b = 4, 64
    inputs = [t.float() for t in draw(rng, m, b, (3, 16, 16))]
    if mixture == "log_weights":
        inputs.append(draw_log_weights(rng, m, b).float())
    on_cpu = [t.clone().requires_grad_() for t in inputs]
    on_gpu = [t.cuda().requires_grad_() for t in inputs]
    cpu, gpu = fused_loss(on_cpu, bound, 0.5), fused_loss(on_gpu, bound, 0.5)
    assert_close_to_reference(gpu, cpu.double(), torch.float32, "cuda vs cpu")
    grad_loss = uniform(rng, b, low=0.5, high=1.5).float()
    cpu.backward(grad_loss)
    gpu.backward(grad_loss.cuda())
    for name, c, g in zip(INPUT_NAMES, on_cpu, on_gpu):
        assert_close_to_reference(g.grad, c.grad.double(), torch.float32, f"cuda vs cpu: grad {name}")
