"""Sample-quality metrics for the built-in data (used by ``python -m softmix compare``)."""

from __future__ import annotations

import torch

from softmix.data import GaussianMixture

__all__ = ["mmd", "mixture_metrics"]


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.05, 0.1, 0.2, 0.5, 1.0)) -> float:
    """Squared maximum mean discrepancy with a sum of RBF kernels (biased V-statistic).

    ``x (N, F)``, ``y (M, F)`` (flattened when of higher rank); 0 for equal samples, > 0 else."""
    x, y = x.flatten(1).double(), y.flatten(1).double()

    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def mixture_metrics(samples: torch.Tensor, mixture: GaussianMixture, reference: torch.Tensor | None = None,
                    min_share: float = 0.2) -> dict:
    """Quality of ``samples (N, F)`` against the true mixture.

    - ``high_quality``: share of samples within 3 std of their nearest mode;
    - ``modes_covered``: modes nearest to at least ``min_share`` of the high-quality samples
      one mode would get under the true distribution (``min_share * N / K``, at least 1);
    - ``mmd``: to ``reference`` (fresh true samples) when given;
    - ``nll``: mean negative log-likelihood of the samples under the true mixture.
    """
    samples = samples.float()
    d = torch.cdist(samples, mixture.means)  # (N, K)
    dist, nearest = d.min(dim=1)
    good = dist <= 3 * mixture.std
    counts = torch.bincount(nearest[good], minlength=mixture.num_modes)
    threshold = max(1.0, min_share * samples.shape[0] / mixture.num_modes)
    out = {
        "high_quality": float(good.float().mean()),
        "modes_covered": int((counts >= threshold).sum()),
        "num_modes": mixture.num_modes,
        "nll": float(-mixture.log_prob(samples).mean()),
    }
    if reference is not None:
        out["mmd"] = mmd(samples, reference)
    return out
