"""latent_transform: the fused chain y_l = (v_l v_l^T + s_l I) y_{l-1} against float64 references."""

import pytest
import torch

from op_helpers import DEVICES, FLOAT_DTYPES, assert_close_to_reference, strided
from softmix import ops, reference


def make_inputs(n, d, layers, per_position, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=g, dtype=torch.float64)
    # |v|^2 ~ 1 keeps every layer's output on the scale of its input
    v = torch.randn(layers, n, d, generator=g, dtype=torch.float64) / max(d, 1) ** 0.5
    s_shape = (layers, n) if per_position else (layers,)
    s = torch.rand(s_shape, generator=g, dtype=torch.float64) + 0.5
    return r.to(device), v.to(device), s.to(device)


# Every size the issue names appears at least once: D in {1, 3, 33, 100, 257},
# N in {0, 1, 7, 4096}, L in 1..4, s per layer and per position.
SHAPES = [
    (1, 1, 1, False),
    (7, 3, 2, True),
    (7, 33, 3, False),
    (4096, 100, 2, False),
    (4096, 33, 4, True),
    (1, 257, 4, True),
    (7, 257, 1, False),
    (0, 33, 2, False),
    (0, 100, 3, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,layers,per_position", SHAPES)
def test_values_and_gradients_match_float64_reference(device, n, d, layers, per_position):
    r64, v64, s64 = make_inputs(n, d, layers, per_position, seed=n * 1000 + d * 10 + layers, device=device)
    grad_y = torch.randn(n, d, dtype=torch.float64, device=device)
    for dtype in FLOAT_DTYPES:
        # the reference runs in float64 on exactly the values the op sees
        r, v = r64.to(dtype), v64.to(dtype)
        s = s64.float() if dtype != torch.float64 else s64  # a float32 scale beside half features
        args64 = [t.detach().double().requires_grad_() for t in (r, v, s)]
        expected = reference.latent_transform(*args64)
        expected.backward(grad_y)

        args = [t.detach().clone().requires_grad_() for t in (r, v, s)]
        y = ops.latent_transform(*args)
        assert y.dtype == dtype and y.shape == (n, d)
        y.backward(grad_y.to(dtype))
        assert_close_to_reference(y, expected.detach(), dtype, f"y ({dtype})")
        for name, arg, arg64 in zip("rvs", args, args64):
            assert arg.grad.dtype == arg.dtype and arg.grad.shape == arg.shape
            assert_close_to_reference(arg.grad, arg64.grad, dtype, f"grad {name} ({dtype})")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_give_the_same_result(device):
    r, v, s = make_inputs(37, 33, 3, True, seed=1, device=device)
    expected = ops.latent_transform(r, v, s)
    rs, vs, ss = strided(r), strided(v), strided(s)
    assert not rs.is_contiguous() and not vs.is_contiguous() and not ss.is_contiguous()
    torch.testing.assert_close(ops.latent_transform(rs, vs, ss), expected, rtol=0, atol=0)
    # a transposed layout too: v stored as (N, L, D) and viewed as (L, N, D)
    vt = v.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(ops.latent_transform(r, vt, s), expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_position", [False, True])
def test_gradcheck_float64(per_position):
    r, v, s = make_inputs(5, 4, 3, per_position, seed=7)
    args = [t.requires_grad_() for t in (r, v, s)]
    assert torch.autograd.gradcheck(ops.latent_transform, args)


def test_factored_form_equals_the_papers_materialised_matrices():
    r, v, s = make_inputs(9, 6, 3, True, seed=3)
    torch.testing.assert_close(
        reference.latent_transform(r, v, s), reference.latent_transform_materialized(r, v, s), rtol=1e-12, atol=1e-12
    )


def test_one_layer_is_a_rank_one_update_of_a_scaled_identity():
    # y = v (v . r) + s r, written out by hand
    r, v, s = make_inputs(11, 5, 1, False, seed=4)
    expected = v[0] * (v[0] * r).sum(-1, keepdim=True) + s[0] * r
    torch.testing.assert_close(ops.latent_transform(r, v, s), expected, rtol=1e-12, atol=1e-12)


def test_scale_only_layers_multiply_by_the_product_of_scales():
    # with v = 0 every layer is s_l I
    r, _, s = make_inputs(6, 8, 3, False, seed=5)
    v = torch.zeros(3, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.latent_transform(r, v, s), r * s.prod(), rtol=1e-12, atol=1e-12)
