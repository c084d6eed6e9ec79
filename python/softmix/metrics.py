"""Sample-quality metrics for the built-in data (used by ``python -m softmix compare``)."""

from __future__ import annotations

import math

import torch

from softmix.data import GaussianMixture

__all__ = ["mmd", "mixture_metrics", "quality_radius", "true_posterior", "posterior_kl", "frechet_distance", "knn_precision_recall"]


MMD_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0)  # RBF widths for data on the scale of [-1, 1]^2


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=MMD_BANDWIDTHS) -> float:
    """Squared maximum mean discrepancy with a sum of RBF kernels (biased V-statistic).

    ``x (N, F)``, ``y (M, F)`` (flattened when of higher rank); 0 for equal samples, > 0 else."""
    x, y = x.flatten(1).double(), y.flatten(1).double()

    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def _chi2_quantile(p: float, dof: int) -> float:
    """The ``p``-quantile of the chi-squared distribution with ``dof`` degrees of freedom (bisection)."""
    lo, hi = 0.0, float(dof) + 40.0 * math.sqrt(dof) + 40.0
    a = torch.tensor(dof / 2, dtype=torch.float64)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(torch.special.gammainc(a, torch.tensor(mid / 2, dtype=torch.float64))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def quality_radius(dims: int) -> float:
    """Radius, in stds, of the ball around a mode that counts as high quality in ``dims``
    dimensions: the one that holds as much of the component's mass as 3 std does in 2-D
    (``1 - exp(-4.5)``, 98.9%). Exactly 3 for ``dims = 2``; 4.45 for 8, 7.28 for 32 (a fixed
    3 std would hold 66% of a true 8-D component and almost none of a 32-D one)."""
    return 3.0 if dims == 2 else math.sqrt(_chi2_quantile(1 - math.exp(-4.5), dims))


def mixture_metrics(samples: torch.Tensor, mixture: GaussianMixture, reference: torch.Tensor | None = None,
                    min_share: float = 0.2) -> dict:
    """Quality of ``samples (N, F)`` against the true mixture.

    - ``high_quality``: share of samples within ``quality_radius(F)`` stds of their nearest mode
      (its own std when the components differ in width): 3 std in 2-D;
    - ``modes_covered``: modes nearest to at least ``min_share`` of the high-quality samples
      one mode would get under the true distribution (``min_share * N / K``, at least 1);
    - ``mmd``: to ``reference`` (fresh true samples) when given, with the bandwidths of ``mmd``
      scaled by ``sqrt(F / 2)`` (unchanged in 2-D) so that they keep their meaning per coordinate;
    - ``nll``: mean negative log-likelihood of the samples under the true mixture.
    """
    samples = samples.float()
    f = samples.shape[1]
    d = torch.cdist(samples, mixture.means)  # (N, K)
    dist, nearest = d.min(dim=1)
    good = dist <= quality_radius(f) * mixture.stds[nearest]
    counts = torch.bincount(nearest[good], minlength=mixture.num_modes)
    threshold = max(1.0, min_share * samples.shape[0] / mixture.num_modes)
    out = {
        "high_quality": float(good.float().mean()),
        "modes_covered": int((counts >= threshold).sum()),
        "num_modes": mixture.num_modes,
        "nll": float(-mixture.log_prob(samples).mean()),
    }
    if reference is not None:
        scale = math.sqrt(f / 2)
        out["mmd"] = mmd(samples, reference, bandwidths=tuple(scale * b for b in MMD_BANDWIDTHS))
    return out


def true_posterior(mixture: GaussianMixture, x_t: torch.Tensor, a_t: float, a_prev: float):
    """The exact backward step ``q(x_prev | x_t)`` of a Gaussian-mixture data distribution.

    With ``x0 ~ sum_k N(mu_k, s^2 I) / K`` and ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``,
    ``q(x_prev | x_t) = sum_k pi_k(x_t) N(m_k(x_t), v I)``. Returns ``(log_pi (N, K),
    means (N, K, F), var)`` (float64).
    """
    if not mixture.equal_widths:
        raise ValueError("true_posterior needs components of equal width (a float std)")
    x_t = x_t.double()
    mu, s2 = mixture.means.double(), float(mixture.stds[0]) ** 2
    alpha = a_t / a_prev  # the step x_prev -> x_t
    v_prev = a_prev * s2 + 1 - a_prev  # marginal variance of x_prev within a component
    v_t = a_t * s2 + 1 - a_t
    log_pi = -0.5 * torch.cdist(x_t, math.sqrt(a_t) * mu).square() / v_t
    log_pi = log_pi - torch.logsumexp(log_pi, dim=1, keepdim=True)
    precision = 1 / v_prev + alpha / (1 - alpha)
    means = (math.sqrt(a_prev) * mu[None] / v_prev + math.sqrt(alpha) * x_t[:, None] / (1 - alpha)) / precision
    return log_pi, means, 1 / precision


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    """``log N(x; mean, var I)`` over the last dim (broadcasting)."""
    f = x.shape[-1]
    return -0.5 * (x - mean).square().sum(-1) / var - 0.5 * f * math.log(2 * math.pi * var)


@torch.no_grad()
def posterior_kl(model, schedule, mixture: GaussianMixture, num: int = 512, num_eta: int = 256,
                 max_steps: int = 20, generator: torch.Generator | None = None) -> float:
    """Mean over the chain of ``KL(q(x_{t-1} | x_t) || p_theta(x_{t-1} | x_t))``, ``x_t ~ q(x_t)``,
    in nats, estimated by Monte Carlo, for an epsilon-predicting model (one ``x_{t-1} ~ q`` per ``x_t``, ``num`` of them).

    The chain is the schedule's own (``steps = num_steps``, ancestral variance); the last step
    (variance 0: a point mass, where the KL is not finite) is left out, and at most
    ``max_steps`` evenly spaced steps are evaluated. For an ``SMD`` model
    ``p_theta = mean_j N(mu(eta_j), sigma^2)`` over ``num_eta`` draws of ``eta`` (a Monte Carlo
    estimate of the mixture; it overestimates the KL slightly when ``num_eta`` is small).
    """
    from softmix.wrap import _unwrap, is_smd, model_output_tensor

    timesteps, a_ts, a_prevs = schedule.respace(schedule.num_steps)
    idx = list(range(len(timesteps) - 1))  # the last step is deterministic
    if len(idx) > max_steps:
        idx = sorted({round(i * (len(idx) - 1) / (max_steps - 1)) for i in range(max_steps)})
    smd = _unwrap(model) if is_smd(model) else None
    was_training = model.training
    model.eval()
    kls = []
    try:
        for i in idx:
            a_t, a_p = float(a_ts[i]), float(a_prevs[i])
            x0 = mixture.sample(num, generator)
            x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * torch.randn(x0.shape, generator=generator)
            log_pi, means, var = true_posterior(mixture, x_t, a_t, a_p)
            k = torch.multinomial(log_pi.exp(), 1, generator=generator).squeeze(1)
            x_prev = means[torch.arange(num), k] + math.sqrt(var) * torch.randn(num, x0.shape[1], generator=generator,
                                                                                 dtype=torch.float64)
            log_q = torch.logsumexp(log_pi + _log_normal(x_prev[:, None], means, var), dim=1)
            t = torch.full((num,), int(timesteps[i]), dtype=torch.long)
            j = num_eta if smd is not None else 1
            kwargs = {"eta": smd.sample_eta(x_t.float(), generator, num_samples=j)} if smd is not None else {}
            out = model_output_tensor(model(x_t.float(), t, **kwargs)).double()  # (j * num, F)
            # the ancestral step's mean (denoise_step with eta = 1, without its noise), epsilon prediction
            x_rep = x_t.repeat(j, 1)
            sigma2 = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
            x0_pred = (x_rep - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
            mean_p = math.sqrt(a_p) * x0_pred + math.sqrt(1 - a_p - sigma2) * out
            log_p = _log_normal(x_prev[None], mean_p.reshape(j, num, -1), sigma2)  # (j, num)
            log_p = torch.logsumexp(log_p, dim=0) - math.log(j)
            kls.append(float((log_q - log_p).mean()))
    finally:
        model.train(was_training)
    return sum(kls) / len(kls)


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``x (N, F)`` and ``y (M, F)``:
    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))`` (FID's formula on any features)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = torch.cov(x.T), torch.cov(y.T)
    # tr((S_x S_y)^(1/2)) = sum of sqrt of the eigenvalues of S_x^(1/2) S_y S_x^(1/2) (symmetric PSD)
    evals, evecs = torch.linalg.eigh(s_x)
    root_x = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root_x @ s_y @ root_x).clamp(min=0).sqrt().sum()
    return float((mu_x - mu_y).square().sum() + s_x.trace() + s_y.trace() - 2 * cross)


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) on features ``(N, F)``:
    precision is the share of ``fake`` inside the union of the real k-NN balls, recall the share
    of ``real`` inside the union of the fake k-NN balls."""
    real, fake = real.flatten(1).double(), fake.flatten(1).double()

    def inside(points, support):
        radii = torch.cdist(support, support).kthvalue(k + 1, dim=1).values  # k-th neighbour (self is 0)
        return (torch.cdist(points, support) <= radii[None]).any(1).double().mean()

    return float(inside(fake, real)), float(inside(real, fake))
