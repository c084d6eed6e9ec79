"""latent_transform: the SMD head's chain ``y_l = (v_l v_l^T + s_l I) y_{l-1}``, ``y_0 = r``.

DESIGN.md 3.1. The fused op against softmix.reference in float64: values and the gradients
for r, v and s, over the issue's sizes, dtypes, per-layer and per-position s, and layouts;
gradcheck; the textbook facts of the map; the errors bad input gets.
"""

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


def draw(rng, n, d, layers, per_position):
    """float64 r (N, D), v (L, N, D), s (L,) or (L, N) with every layer of order-one gain."""
    r = randn(rng, n, d)
    v = randn(rng, layers, n, d) / d**0.5  # |v_l|^2 ~ 1, so y stays on the scale of r
    s = uniform(rng, *((layers, n) if per_position else (layers,)), low=0.5, high=1.5)
    return r, v, s


def reference_with_grads(r, v, s, grad_y):
    """y and (grad r, grad v, grad s) of the float64 reference on the op's exact inputs."""
    args = [as_reference(t, requires_grad=True) for t in (r, v, s)]
    y = reference.latent_transform(*args)
    y.backward(as_reference(grad_y))
    return y.detach(), [a.grad for a in args]


# Every size of the issue at least once, not the cross product:
# N in {0, 1, 7, 4096}, D in {1, 3, 33, 100, 257}, L in 1..4, s per layer and per position;
# and each path of the CUDA kernels (rows of up to 128, up to 256 and more values; L above 4).
SIZES = [
    # N,   D,  L, per_position
    (1, 1, 1, False),
    (7, 1, 3, True),
    (7, 3, 2, False),
    (1, 3, 4, True),
    (7, 33, 4, False),
    (7, 33, 1, True),
    (1, 100, 2, False),
    (7, 257, 3, True),
    (4096, 100, 2, False),
    (7, 200, 3, False),  # 129 to 256 values: the CUDA kernel holds 8 per lane
    (7, 256, 4, True),
    (7, 33, 5, True),  # more layers than the CUDA register kernel takes
    (4096, 257, 1, True),
    (4096, 3, 4, True),
    (0, 33, 2, False),
    (0, 257, 3, True),
]


def size_id(size):
    n, d, layers, per_position = size
    return f"N{n}-D{d}-L{layers}-s_{'per_position' if per_position else 'per_layer'}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_values_and_gradients_match_float64_reference(rng, device, dtype, size):
    n, d, layers, per_position = size
    r64, v64, s64 = draw(rng, n, d, layers, per_position)
    r, v, s = (as_input(t, dtype, device, requires_grad=True) for t in (r64, v64, s64))
    grad_y = as_input(randn(rng, n, d), dtype, device)

    y = ops.latent_transform(r, v, s)
    assert y.dtype == dtype and y.shape == (n, d) and y.device.type == device
    y.backward(grad_y)

    expected_y, expected_grads = reference_with_grads(r, v, s, grad_y)
    assert_close_to_reference(y, expected_y, dtype, "y")
    for name, arg, expected in zip(("r", "v", "s"), (r, v, s), expected_grads):
        assert arg.grad.dtype == arg.dtype and arg.grad.shape == arg.shape, name
        assert_close_to_reference(arg.grad, expected, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.float64], ids=str)
def test_s_may_be_kept_in_higher_precision_beside_half_features(rng, device, dtype, s_dtype):
    # a learned scale often stays float32 under autocast; y keeps r's dtype, grad s keeps s's
    r64, v64, s64 = draw(rng, 33, 100, 2, per_position=False)
    r, v = as_input(r64, dtype, device, True), as_input(v64, dtype, device, True)
    s = as_input(s64, s_dtype, device, True)
    grad_y = as_input(randn(rng, 33, 100), dtype, device)
    y = ops.latent_transform(r, v, s)
    assert y.dtype == dtype
    y.backward(grad_y)
    expected_y, expected_grads = reference_with_grads(r, v, s, grad_y)
    assert_close_to_reference(y, expected_y, dtype, "y")
    assert s.grad.dtype == s_dtype
    for name, arg, expected in zip(("r", "v", "s"), (r, v, s), expected_grads):
        assert_close_to_reference(arg.grad, expected, dtype, f"grad {name}")


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("which", ["r", "v", "s", "all"])
@pytest.mark.parametrize("per_position", [False, True], ids=["s_per_layer", "s_per_position"])
def test_non_contiguous_inputs_match_float64_reference(rng, device, layout, which, per_position):
    dtype = torch.float32
    tensors = dict(zip("rvs", draw(rng, 45, 33, 3, per_position)))
    args = {}
    for name, t64 in tensors.items():
        t = as_input(t64, dtype, device)
        args[name] = (non_contiguous(t, layout) if which in (name, "all") else t).requires_grad_()
    grad_y = non_contiguous(as_input(randn(rng, 45, 33), dtype, device), layout)

    y = ops.latent_transform(args["r"], args["v"], args["s"])
    y.backward(grad_y)
    expected_y, expected_grads = reference_with_grads(args["r"], args["v"], args["s"], grad_y)
    assert_close_to_reference(y, expected_y, dtype, "y")
    for (name, arg), expected in zip(args.items(), expected_grads):
        assert arg.grad.shape == arg.shape
        assert_close_to_reference(arg.grad, expected, dtype, f"grad {name}")


@pytest.mark.parametrize("d", [64, 200])
def test_unaligned_contiguous_inputs_match_float64_reference(rng, device, d):
    # rows whose length allows 16-byte packs, at an address that does not
    r64, v64, s64 = draw(rng, 9, d, 3, True)
    r, v = (at_odd_offset(as_input(t, torch.float32, device)).requires_grad_() for t in (r64, v64))
    s = as_input(s64, torch.float32, device, True)
    grad_y = at_odd_offset(as_input(randn(rng, 9, d), torch.float32, device))
    y = ops.latent_transform(r, v, s)
    y.backward(grad_y)
    expected_y, expected_grads = reference_with_grads(r, v, s, grad_y)
    assert_close_to_reference(y, expected_y, torch.float32, "y")
    for name, arg, expected in zip("rvs", (r, v, s), expected_grads):
        assert_close_to_reference(arg.grad, expected, torch.float32, f"grad {name}")


def test_v_laid_out_position_major_as_a_hypernetwork_emits_it(rng, device):
    # a hypernetwork's linear layer emits (N, L * D); viewed as (L, N, D) it is a permuted view
    n, d, layers = 20, 7, 3
    r, v, s = (as_input(t, torch.float64, device) for t in draw(rng, n, d, layers, True))
    emitted = v.permute(1, 0, 2).reshape(n, layers * d)
    v_view = emitted.view(n, layers, d).permute(1, 0, 2)
    assert not v_view.is_contiguous()
    expected = reference.latent_transform(*map(as_reference, (r, v, s)))
    assert_close_to_reference(ops.latent_transform(r, v_view, s), expected, torch.float64, "y")


@pytest.mark.parametrize("per_position", [False, True], ids=["s_per_layer", "s_per_position"])
def test_gradcheck_float64(rng, per_position):
    r, v, s = (t.requires_grad_() for t in draw(rng, 5, 3, 3, per_position))
    assert torch.autograd.gradcheck(ops.latent_transform, (r, v, s))


@pytest.mark.parametrize("wrt", ["r", "v", "s"])
def test_gradcheck_float64_one_input_at_a_time(rng, wrt):
    # the backward must also be right when only some inputs need a gradient
    args = dict(zip("rvs", draw(rng, 4, 5, 2, per_position=True)))
    args[wrt].requires_grad_()
    assert torch.autograd.gradcheck(ops.latent_transform, tuple(args.values()))


@pytest.mark.parametrize("per_position", [False, True], ids=["s_per_layer", "s_per_position"])
def test_empty_batch_gives_empty_output_and_zero_gradients(rng, device, per_position):
    r, v, s = (as_input(t, torch.float32, device, True) for t in draw(rng, 0, 33, 2, per_position))
    y = ops.latent_transform(r, v, s)
    assert y.shape == (0, 33)
    y.sum().backward()
    assert r.grad.shape == (0, 33) and v.grad.shape == (2, 0, 33) and s.grad.shape == s.shape
    # no positions contribute to a per-layer scale: its gradient is exactly zero
    assert torch.equal(s.grad, torch.zeros_like(s))


# --------------------------------------------------------------------------------------
# the map itself
# --------------------------------------------------------------------------------------


def test_factored_form_equals_the_papers_materialised_matrices(rng):
    r, v, s = draw(rng, 9, 6, 3, per_position=True)
    expected = reference.latent_transform_materialized(r, v, s)
    assert_close_to_reference(ops.latent_transform(r, v, s), expected, torch.float64, "fused vs materialised")
    assert_close_to_reference(reference.latent_transform(r, v, s), expected, torch.float64, "reference vs materialised")


def test_one_layer_is_a_rank_one_update_of_a_scaled_identity(rng, device):
    r, v, s = (as_input(t, torch.float64, device) for t in draw(rng, 11, 5, 1, per_position=False))
    expected = v[0] * (v[0] * r).sum(-1, keepdim=True) + s[0] * r  # v (v . r) + s r
    assert_close_to_reference(ops.latent_transform(r, v, s), expected, torch.float64, "y")


def test_layers_apply_in_order_first_to_last(rng, device):
    # y_L = T_L(... T_1(r)): the chain of two layers is layer 1's output fed to layer 2
    r, v, s = (as_input(t, torch.float64, device) for t in draw(rng, 13, 4, 2, per_position=True))
    first = ops.latent_transform(r, v[:1], s[:1])
    both = ops.latent_transform(first, v[1:], s[1:])
    assert_close_to_reference(ops.latent_transform(r, v, s), both, torch.float64, "chain")
    swapped = ops.latent_transform(r, v.flip(0), s.flip(0))
    assert not torch.allclose(swapped, both)  # the layers do not commute: the order was tested


def test_zero_vectors_leave_the_product_of_the_scales(rng, device):
    # v = 0: every layer is s_l I
    r, _, s = (as_input(t, torch.float64, device) for t in draw(rng, 6, 8, 3, per_position=False))
    v = torch.zeros(3, 6, 8, dtype=torch.float64, device=device)
    assert_close_to_reference(ops.latent_transform(r, v, s), r * s.prod(), torch.float64, "y")


def test_each_layer_is_symmetric(rng):
    # <a, T b> = <T a, b> for T = v v^T + s I, per position
    _, v, s = draw(rng, 10, 6, 1, per_position=True)
    a, b = randn(rng, 10, 6), randn(rng, 10, 6)
    lhs = (a * ops.latent_transform(b, v, s)).sum(-1)
    rhs = (ops.latent_transform(a, v, s) * b).sum(-1)
    assert_close_to_reference(lhs, rhs, torch.float64, "<a, T b> vs <T a, b>")


# --------------------------------------------------------------------------------------
# bad input: a Python exception naming the op, the argument and the shapes
# --------------------------------------------------------------------------------------


def good(n=6, d=5, layers=2):
    return torch.randn(n, d), torch.randn(layers, n, d), torch.rand(layers) + 0.5


BAD_INPUTS = {
    "r of rank 1": ((torch.randn(6), *good()[1:]), r"latent_transform.*\br\b.*\(N, D\).*\[6\]"),
    "r of rank 3": ((torch.randn(1, 6, 5), *good()[1:]), r"latent_transform.*\br\b.*\[1, 6, 5\]"),
    "v of rank 2": ((good()[0], torch.randn(6, 5), good()[2]), r"latent_transform.*\bv\b.*\(L, N, D\).*\[6, 5\]"),
    "v with another N": (
        (good()[0], torch.randn(2, 7, 5), good()[2]),
        r"latent_transform.*\bv\b.*\[6, 5\].*\[2, 7, 5\]",
    ),
    "v with another D": ((good()[0], torch.randn(2, 6, 4), good()[2]), r"latent_transform.*\bv\b.*\[2, 6, 4\]"),
    "v without layers": ((good()[0], torch.randn(0, 6, 5), torch.rand(0)), r"latent_transform.*\bv\b.*\[0, 6, 5\]"),
    "s of the wrong length": ((*good()[:2], torch.rand(3)), r"latent_transform.*\bs\b.*\(L,\).*\[3\]"),
    "s per position of the wrong N": ((*good()[:2], torch.rand(2, 5)), r"latent_transform.*\bs\b.*\(L, N\).*\[2, 5\]"),
    "s of rank 3": ((*good()[:2], torch.rand(2, 6, 1)), r"latent_transform.*\bs\b.*\[2, 6, 1\]"),
    "integer r": ((torch.ones(6, 5, dtype=torch.long), *good()[1:]), r"latent_transform.*\br\b.*Long"),
    "integer v": ((good()[0], torch.ones(2, 6, 5, dtype=torch.int32), good()[2]), r"latent_transform.*\bv\b.*Int"),
    "integer s": ((*good()[:2], torch.ones(2, dtype=torch.long)), r"latent_transform.*\bs\b.*Long"),
    "v of another float dtype": ((good()[0], good()[1].double(), good()[2]), r"latent_transform.*\bv\b.*Double"),
}


@pytest.mark.parametrize("args,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_an_error_naming_the_argument(args, message):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        ops.latent_transform(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("on_cuda", ["r", "v", "s"])
def test_mixed_devices_are_rejected(on_cuda):
    args = dict(zip("rvs", good()))
    args[on_cuda] = args[on_cuda].cuda()
    with pytest.raises(RuntimeError, match=rf"latent_transform.*device.*\b{on_cuda}\b"):
        ops.latent_transform(*args.values())


@pytest.mark.cuda
def test_cuda_agrees_with_cpu(rng):
    r, v, s = draw(rng, 300, 100, 3, per_position=True)
    cpu = ops.latent_transform(r.float(), v.float(), s.float())
    gpu = ops.latent_transform(r.float().cuda(), v.float().cuda(), s.float().cuda())
    assert_close_to_reference(gpu, cpu.double(), torch.float32, "cuda vs cpu")
