"""The operators as PyTorch sees them: registration (opcheck), torch.compile, and the errors
bad input gets."""

import pytest
import torch

from op_helpers import CUDA
from softmix import ops


def lt_args(n=6, d=5, layers=2, grad=False):
    r, v, s = torch.randn(n, d), torch.randn(layers, n, d) * 0.4, torch.rand(layers) + 0.5
    return [t.requires_grad_(grad) for t in (r, v, s)]


def mc_args(m=3, b=4, grad=False):
    pred, target, weight = torch.randn(m, b, 2, 3), torch.randn(b, 2, 3), torch.rand(b) + 0.1
    return [pred.requires_grad_(grad), target.requires_grad_(grad), weight.requires_grad_(grad)]


def step_args(b=4, grad=False):
    x, m, noise = torch.randn(b, 3, 4), torch.randn(b, 3, 4), torch.randn(b, 3, 4)
    a_t = torch.rand(b) * 0.5 + 0.2
    return [x.requires_grad_(grad), m.requires_grad_(grad), a_t, a_t + 0.1, noise.requires_grad_(grad)]


OPCHECK_CASES = [
    ("latent_transform", lambda g: (*lt_args(grad=g),)),
    ("latent_transform", lambda g: (lt_args(grad=g)[0], lt_args(grad=g)[1], (torch.rand(2, 6) + 0.5).requires_grad_(g))),
    ("mc_loss_with_errors", lambda g: (*mc_args(grad=g), "jensen", 1.0)),
    ("mc_loss_with_errors", lambda g: (*mc_args(grad=g), "logmeanexp", 0.5)),
    ("denoise_step", lambda g: (*step_args(grad=g), 1.0, "epsilon", None)),
    ("denoise_step", lambda g: (*step_args(grad=g), 0.3, "v_prediction", 1.0)),
    ("denoise_step", lambda g: (*step_args(grad=g)[:4], None, 0.0, "sample", None)),
]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name,make_args", OPCHECK_CASES)
def test_opcheck(name, make_args, requires_grad):
    result = torch.library.opcheck(getattr(torch.ops.softmix, name).default, make_args(requires_grad))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_mc_loss_is_reachable_as_torch_ops_and_has_gradients():
    pred, target, weight = mc_args(grad=True)
    loss = torch.ops.softmix.mc_loss(pred, target, weight, "logmeanexp", 0.7)
    loss.sum().backward()
    assert pred.grad is not None and target.grad is not None and weight.grad is not None


def all_three(r, v, s, pred, target, weight, x, m, a_t, a_prev, noise):
    y = ops.latent_transform(r, v, s)
    loss = ops.mc_loss(pred + y.mean(), target, weight, "logmeanexp", 0.5)
    x_prev, x0 = ops.denoise_step(x, m * loss.mean(), a_t, a_prev, noise, 0.5, "epsilon", 1.0)
    return y.sum() + loss.sum() + x_prev.square().sum() + x0.sum()


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    args = [*lt_args(grad=True), *mc_args(grad=True), *step_args(grad=True)]
    clones = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    eager = all_three(*args)
    eager.backward()
    compiled = torch.compile(all_three, fullgraph=True)(*clones)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, c in zip(args, clones):
        if a.requires_grad:
            torch.testing.assert_close(c.grad, a.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# bad input: a Python exception that names the argument and the shapes, never a crash
# --------------------------------------------------------------------------------------

BAD_LATENT_TRANSFORM = [
    ((torch.randn(6), torch.randn(2, 6, 5), torch.rand(2)), r"latent_transform: r must have shape \(N, D\), got \[6\]"),
    ((torch.randn(6, 5), torch.randn(2, 7, 5), torch.rand(2)), r"v must have shape \(L, N, D\).*\[6, 5\].*\[2, 7, 5\]"),
    ((torch.randn(6, 5), torch.randn(2, 6, 4), torch.rand(2)), r"v must have shape"),
    ((torch.randn(6, 5), torch.randn(6, 5), torch.rand(2)), r"v must have shape \(L, N, D\)"),
    ((torch.randn(6, 5), torch.randn(2, 6, 5), torch.rand(3)), r"s must have shape \(L,\) = \(2,\) or \(L, N\) = \(2, 6\).*\[3\]"),
    ((torch.randn(6, 5), torch.randn(2, 6, 5), torch.rand(2, 5)), r"s must have shape.*\[2, 5\]"),
    ((torch.randn(6, 5), torch.randn(0, 6, 5), torch.rand(0)), r"at least one layer"),
    ((torch.randint(0, 3, (6, 5)), torch.randn(2, 6, 5), torch.rand(2)), r"r must be float32, float64, float16 or bfloat16, got Long"),
    ((torch.randn(6, 5), torch.randn(2, 6, 5).double(), torch.rand(2)), r"v must have the dtype of r \(Float\), got Double"),
]


@pytest.mark.parametrize("args,message", BAD_LATENT_TRANSFORM)
def test_latent_transform_rejects_bad_input(args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.latent_transform(*args)


def test_mc_loss_rejects_bad_input():
    pred, target, weight = mc_args()
    with pytest.raises(RuntimeError, match=r"mc_loss: target must have shape \(B, \*S\) = \[4, 2, 3\].*got \[4, 3, 2\]"):
        ops.mc_loss(pred, target.reshape(4, 3, 2), weight)
    with pytest.raises(RuntimeError, match=r"mc_loss: weight must have shape \(B,\) = \(4,\).*got \[5\]"):
        ops.mc_loss(pred, target, torch.rand(5))
    with pytest.raises(RuntimeError, match=r"pred must have shape \(M, B, \*S\), got \[4\]"):
        ops.mc_loss(torch.randn(4), torch.randn(4), weight)
    with pytest.raises(RuntimeError, match=r"at least one Monte Carlo sample"):
        ops.mc_loss(pred[:0], target, weight)
    with pytest.raises(RuntimeError, match=r"weight must be float32.*got Int"):
        ops.mc_loss(pred, target, torch.ones(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"target must have the dtype of pred \(Float\), got Half"):
        ops.mc_loss(pred, target.half(), weight)
    with pytest.raises(ValueError, match=r"mc_loss: unknown bound 'tight'; expected 'jensen' or 'logmeanexp'"):
        ops.mc_loss(pred, target, weight, bound="tight")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"mc_loss: temperature must be a positive finite number"):
            ops.mc_loss(pred, target, weight, "logmeanexp", bad)


def test_denoise_step_rejects_bad_input():
    x, m, a_t, a_prev, noise = step_args()
    with pytest.raises(RuntimeError, match=r"denoise_step: model_output must have the shape of x_t \[4, 3, 4\], got \[4, 12\]"):
        ops.denoise_step(x, m.reshape(4, 12), a_t, a_prev, noise)
    with pytest.raises(RuntimeError, match=r"alpha_bar_t must have shape \(B,\) = \(4,\) matching x_t \[4, 3, 4\], got \[3\]"):
        ops.denoise_step(x, m, a_t[:3], a_prev, noise)
    with pytest.raises(RuntimeError, match=r"alpha_bar_prev must have shape \(B,\).*got \[4, 1\]"):
        ops.denoise_step(x, m, a_t, a_prev[:, None], noise)
    with pytest.raises(RuntimeError, match=r"noise must have the shape of x_t"):
        ops.denoise_step(x, m, a_t, a_prev, noise[:2])
    with pytest.raises(RuntimeError, match=r"x_t must be float32.*got Long"):
        ops.denoise_step(x.long(), m.long(), a_t, a_prev, noise)
    with pytest.raises(RuntimeError, match=r"model_output must have the dtype of x_t"):
        ops.denoise_step(x, m.double(), a_t, a_prev, noise)
    with pytest.raises(ValueError, match=r"unknown prediction_type 'eps'; expected 'epsilon', 'v_prediction' or 'sample'"):
        ops.denoise_step(x, m, a_t, a_prev, noise, prediction_type="eps")
    with pytest.raises(ValueError, match=r"alpha_bar_t must lie in \(0, 1\)"):
        ops.denoise_step(x, m, torch.tensor([0.5, 1.0, 0.3, 0.2]), torch.ones(4), noise)
    with pytest.raises(ValueError, match=r"alpha_bar_prev must lie in \[alpha_bar_t, 1\]"):
        ops.denoise_step(x, m, a_t, a_t - 0.1, noise)
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0"):
        ops.denoise_step(x, m, a_t, a_prev, noise, eta=-0.5)
    with pytest.raises(ValueError, match=r"clip_sample must be positive"):
        ops.denoise_step(x, m, a_t, a_prev, noise, clip_sample=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_mixed_devices_are_rejected():
    r, v, s = lt_args()
    with pytest.raises(RuntimeError, match=r"latent_transform: all tensors must be on one device; r is on cpu but v is on cuda"):
        ops.latent_transform(r, v.cuda(), s)
    pred, target, weight = mc_args()
    with pytest.raises(RuntimeError, match=r"mc_loss: all tensors must be on one device"):
        ops.mc_loss(pred.cuda(), target, weight.cuda())
    x, m, a_t, a_prev, noise = step_args()
    with pytest.raises(RuntimeError, match=r"denoise_step: all tensors must be on one device"):
        ops.denoise_step(x.cuda(), m.cuda(), a_t, a_prev.cuda(), noise.cuda())
