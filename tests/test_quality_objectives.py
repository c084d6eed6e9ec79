"""The training objectives added for issue 4: the exact per-step sharpness ``k_t``, the
``"posterior"`` bound built on it, and the per-step conditional VAE of ``softmix.posterior``."""

import math

import pytest
import torch

import softmix
from softmix import SMD, NoiseSchedule
from softmix.loss import step_precision
from softmix.nets import MLPDenoiser
from softmix.posterior import PosteriorEncoder, elbo_loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_step_precision_is_the_log_density_of_the_ancestral_step(prediction_type):
    """-k_t e = log N(mu(target); mu(pred), sigma_t^2) - log N(mu(target); mu(target), sigma_t^2),
    with mu the mean of the sampler's own ancestral step (denoise_step, eta = 1, no noise)."""
    torch.manual_seed(0)
    s = NoiseSchedule(10)
    b, f = 6, 3
    t = torch.tensor([1, 2, 3, 5, 7, 9])
    x_t, target = torch.randn(b, f, dtype=torch.float64), torch.randn(b, f, dtype=torch.float64)
    pred = target + 0.3 * torch.randn(b, f, dtype=torch.float64)
    a_t = s.alphas_cumprod.double()[t]
    a_prev = s.alphas_cumprod.double()[t - 1]

    def mean(out):
        x, _ = softmix.ops.denoise_step(x_t, out, a_t, a_prev, noise=torch.zeros_like(x_t), eta=1.0,
                                        prediction_type=prediction_type)
        return x

    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    log_ratio = -(mean(pred) - mean(target)).square().sum(1) / (2 * var)
    e = (pred - target).square().mean(1)
    k = step_precision(s, t, f, prediction_type, min_variance=0.0).double()
    torch.testing.assert_close(-k * e, log_ratio, rtol=1e-4, atol=1e-8)


def test_step_precision_grows_as_steps_get_few_and_floors_the_last_step():
    k4 = step_precision(NoiseSchedule(4), torch.arange(4), 2)
    k1000 = step_precision(NoiseSchedule(1000), torch.arange(1000), 2)
    assert torch.isfinite(k4).all() and (k4 > 0).all()
    assert k4[1:].min() > 10 * k1000[1:].max(), "a 4-step chain is much sharper than a 1000-step one"
    # the last step has posterior variance 0; the floor makes it finite and sets its value
    c2 = 1 - NoiseSchedule(4).alphas_cumprod[0]  # epsilon slope^2 at t=0: beta / alpha * beta / beta
    assert step_precision(NoiseSchedule(4), torch.tensor([0]), 2, min_variance=1e-2) == pytest.approx(
        float(2 * c2 / (1 - c2) / (2 * 1e-2)), rel=1e-4)


def _model():
    torch.manual_seed(0)
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4, inject="output")
    torch.nn.init.normal_(model.heads[0].w_out.weight)
    for layer in (model.heads[0].hyper, model.identifier.net[-1]):  # components far apart
        torch.nn.init.normal_(layer.weight, std=0.7)
    return model


def test_posterior_bound_with_one_sample_is_the_simple_loss():
    model, s = _model(), NoiseSchedule(4)
    x0, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.randint(0, 4, (8,))
    eta = torch.randn(8, 2)
    kw = dict(num_samples=1, t=t, noise=noise, eta=eta, reduction="none")
    torch.testing.assert_close(softmix.training_loss(model, s, x0, bound="posterior", **kw),
                               softmix.training_loss(model, s, x0, bound="jensen", **kw))


def test_posterior_bound_is_the_nearest_component_when_sharp_and_the_mean_when_wide():
    model = _model()
    b, m = 8, 6
    x0, noise, eta = torch.randn(b, 2), torch.randn(b, 2), torch.randn(m * b, 2)
    t = torch.zeros(b, dtype=torch.long)
    for steps, floor, expect in ((4, 1e-6, "min"), (1000, 1.0, "mean")):
        s = NoiseSchedule(steps)
        loss = softmix.training_loss(model, s, x0, num_samples=m, bound="posterior", t=t, noise=noise, eta=eta,
                                     min_variance=floor, reduction="none")
        pred = model(s.add_noise(x0, noise, t), t, eta=eta).reshape(m, b, 2)
        e = (pred - noise).square().mean(-1)  # (M, B)
        ref = e.min(0).values if expect == "min" else e.mean(0)
        torch.testing.assert_close(loss, ref, rtol=2e-3, atol=1e-4)
        assert not torch.allclose(e.min(0).values, e.mean(0), rtol=0.05), "the components must differ"


def test_elbo_starts_at_the_prior_and_trains_the_encoder():
    model, s = _model(), NoiseSchedule(4)
    enc = PosteriorEncoder.for_model(model, hidden=16)
    x0, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.randint(0, 4, (8,))
    g = torch.Generator().manual_seed(0)
    loss = elbo_loss(model, enc, s, x0, t=t, noise=noise, generator=g, reduction="none")
    # q = N(0, I) at init: KL = 0 and eta is a prior draw, so the loss is the squared error
    g = torch.Generator().manual_seed(0)
    eta = torch.randn(8, 2, generator=g)
    pred = model(s.add_noise(x0, noise, t), t, eta=eta)
    torch.testing.assert_close(loss, (pred - noise).square().mean(1))
    loss.mean().backward()
    assert enc.out.weight.grad.abs().sum() > 0, "the reconstruction reaches the encoder"
    with pytest.raises(ValueError, match="SMD"):
        elbo_loss(MLPDenoiser(2, hidden=8, layers=1), enc, s, x0)


def test_elbo_kl_term_is_the_gaussian_kl():
    model, s = _model(), NoiseSchedule(4)
    enc = PosteriorEncoder.for_model(model, hidden=16)
    torch.nn.init.normal_(enc.out.weight, std=0.5)
    x0, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.randint(0, 4, (8,))
    kw = dict(t=t, noise=noise, reduction="none")
    a = elbo_loss(model, enc, s, x0, kl_weight=0.0, generator=torch.Generator().manual_seed(1), **kw)
    b = elbo_loss(model, enc, s, x0, kl_weight=1.0, generator=torch.Generator().manual_seed(1), **kw)
    mean, log_var = enc(s.add_noise(x0, noise, t), x0, t)
    kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(1)
    k = step_precision(s, t, 2)
    torch.testing.assert_close(b - a, kl / k, rtol=1e-4, atol=1e-6)
    assert (kl > 0).all()
