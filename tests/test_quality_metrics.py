"""The quality metrics of issue 4: the Gaussian-mixture posterior, the per-step KL, the
Fréchet distance and k-NN precision/recall."""

import math

import torch

from softmix import NoiseSchedule
from softmix.data import GaussianMixture
from softmix.metrics import frechet_distance, knn_precision_recall, posterior_kl, true_posterior


def test_true_posterior_mean_matches_importance_sampling():
    mix = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, 1.0]]), std=0.2)
    a_t, a_prev = 0.3, 0.7
    x_t = torch.tensor([[0.2, 0.1], [-0.5, 0.4]])
    log_pi, means, _ = true_posterior(mix, x_t, a_t, a_prev)
    exact = (log_pi.exp()[..., None] * means).sum(1)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x_prev = math.sqrt(a_prev) * mix.sample(n, g).double() + math.sqrt(1 - a_prev) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    alpha = a_t / a_prev
    for i in range(2):
        logw = -((x_t[i].double() - math.sqrt(alpha) * x_prev).square().sum(1)) / (2 * (1 - alpha))
        w = (logw - logw.max()).exp()
        mc = (w[:, None] * x_prev).sum(0) / w.sum()
        torch.testing.assert_close(exact[i], mc, atol=1e-2, rtol=0)


class _Oracle(torch.nn.Module):
    """Predicts the exact E[eps | x_t] of the mixture (the best single-Gaussian step)."""

    def __init__(self, mix, schedule):
        super().__init__()
        self.mix, self.schedule = mix, schedule
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        a = float(self.schedule.alphas_cumprod[int(t[0])])
        log_pi, means, _ = true_posterior(self.mix, x, a, 1.0)  # the x_0 posterior
        x0 = (log_pi.exp()[..., None] * means).sum(1)
        return ((x.double() - math.sqrt(a) * x0) / math.sqrt(1 - a)).float()


def test_posterior_kl_prefers_the_exact_posterior_mean():
    mix = GaussianMixture(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), std=0.1)
    s = NoiseSchedule(10)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    zero_model = torch.nn.Module()
    zero_model.forward = zero
    kw = dict(num=256, generator=torch.Generator().manual_seed(0))
    kl_oracle = posterior_kl(_Oracle(mix, s), s, mix, **kw)
    kl_zero = posterior_kl(zero_model, s, mix, **dict(kw, generator=torch.Generator().manual_seed(0)))
    assert -0.05 < kl_oracle < kl_zero, (kl_oracle, kl_zero)


def test_frechet_distance_of_a_shift_is_its_squared_length():
    x = torch.randn(500, 5, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0])
    assert abs(frechet_distance(x, x + shift) - float(shift.square().sum())) < 1e-6
    assert abs(frechet_distance(x, x)) < 1e-6
    assert frechet_distance(x, 2 * x) > 1.0  # a wider spread costs


def test_knn_precision_recall_extremes():
    real = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    assert knn_precision_recall(real, real) == (1.0, 1.0)
    assert knn_precision_recall(real, real + 100.0) == (0.0, 0.0)
    # half the fakes on the data, half far away: precision about 1/2, recall unchanged
    fake = torch.cat([real[:150], real[150:] + 100.0])
    prec, rec = knn_precision_recall(real, fake)
    assert abs(prec - 0.5) < 1e-9 and rec < 1.0


def test_true_posterior_refuses_unequal_widths():
    import pytest

    from softmix.data import gmm

    with pytest.raises(ValueError, match="equal width"):
        true_posterior(gmm("grid", width_ratio=4.0), torch.zeros(3, 2), 0.3, 0.7)
