"""Shared pieces of the operator tests: devices, seeds, inputs and dtype tolerances.

Every operator test compares the fused op with ``softmix.reference`` run in float64 on
exactly the values the op saw (inputs are drawn in float64 on the CPU, rounded to the dtype
under test, and the reference gets those rounded values back in float64). What remains is
the op's own arithmetic error, which the tolerances below bound per dtype.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()


def pytest_runtest_setup(item):
    # `cuda` is declared in pyproject.toml; any test carrying it skips where no GPU is present.
    if item.get_closest_marker("cuda") is not None and not CUDA_AVAILABLE:
        pytest.skip("needs a CUDA device")


# cpu always; cuda cases carry the `cuda` marker (and so skip without a GPU). CPU cases never
# touch CUDA: inputs are drawn on the CPU and moved to the device under test.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# (rtol, atol as a fraction of the reference's largest magnitude), against float64.
# float64: the kernels' own rounding; float32: ~1e-5 relative; the half types: a few units of
# their rounding (2^-11 for float16, 2^-8 for bfloat16), since values are computed in float
# and rounded once on the way out.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
FLOAT_DTYPES = list(TOLERANCES)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def assert_close_to_reference(
    actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, what: str, tolerance: float | None = None
):
    """``actual`` (any device, any dtype) against a float64 reference, at ``dtype``'s tolerance
    (or at ``tolerance``, relative, where a test knows better).

    The absolute tolerance scales with the reference's largest magnitude, so entries that
    cancel to near zero are judged against the size of the computation, not their own size.
    """
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    rtol, atol = TOLERANCES[dtype] if tolerance is None else (tolerance, tolerance)
    expected64 = expected64.detach().double().cpu()
    scale = expected64.abs().max().item() if expected64.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected64,
        rtol=rtol,
        atol=atol * max(scale, 1e-30),
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


@pytest.fixture
def rng(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh values per test, reproducible per run.

    The seed is printed with a failure's report. Set ``SOFTMIX_TEST_SEED`` to draw others.
    """
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("SOFTMIX_TEST_SEED", "0"))
    request.node.add_report_section("setup", "seed", f"rng seed {seed} (test id {request.node.nodeid})")
    return torch.Generator().manual_seed(seed)


def randn(rng: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal float64 values, drawn on the CPU."""
    return torch.randn(shape, generator=rng, dtype=torch.float64)


def uniform(rng: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=rng, dtype=torch.float64)


def as_input(t64: torch.Tensor, dtype: torch.dtype, device: str, requires_grad: bool = False) -> torch.Tensor:
    """``t64`` rounded to ``dtype`` on ``device``: what the op under test receives."""
    return t64.to(dtype).to(device).requires_grad_(requires_grad)


def as_reference(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """The exact values ``t`` holds, as a float64 CPU leaf for the reference."""
    return t.detach().double().cpu().requires_grad_(requires_grad)


def at_odd_offset(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t``, contiguous, but one element into a larger buffer.

    Not 16-byte aligned: the CUDA kernels must see it and stream single values, not packs.
    """
    buffer = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buffer[1:].view(t.shape)
    out.copy_(t.detach())
    assert out.is_contiguous() and out.storage_offset() == 1
    return out


def non_contiguous(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view.

    ``"transposed"``: stored with the first and last dimensions swapped, viewed back;
    ``"strided"``: every other element of the last dimension of a wider buffer that also
    starts at a non-zero storage offset.
    """
    t = t.detach()
    if layout == "transposed" and t.dim() >= 2:
        out = t.transpose(0, -1).contiguous().transpose(0, -1)
        assert t.shape[0] == 1 or t.shape[-1] == 1 or not out.is_contiguous()
    elif layout in ("strided", "transposed"):
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        wide[..., 1::2] = t
        out = wide[..., 1::2]
        assert out.storage_offset() == 1 and (t.shape[-1] <= 1 or not out.is_contiguous())
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert torch.equal(out, t)
    return out
