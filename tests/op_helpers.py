"""Shared pieces of the operator tests: devices, dtypes and their tolerances."""

import pytest
import torch

CUDA = torch.cuda.is_available()

# cpu always; cuda cases carry the `cuda` marker and skip where no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]),
]

# (rtol, atol) against a float64 reference, relative to the reference's scale.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
FLOAT_DTYPES = list(TOLERANCES)


def assert_close_to_reference(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Compare with a float64 reference; tolerances scale with the reference's magnitude."""
    rtol, atol = TOLERANCES[dtype]
    scale = expected64.abs().max().item() if expected64.numel() else 1.0
    torch.testing.assert_close(
        actual.double().cpu(), expected64.cpu(), rtol=rtol, atol=atol * max(scale, 1.0), msg=lambda m: f"{what}: {m}"
    )


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other column of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert t.shape[-1] <= 1 or not view.is_contiguous()
    return view
