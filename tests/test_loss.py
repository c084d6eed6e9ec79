"""training_loss: the DDPM loss for plain denoisers, the Monte Carlo SMD bounds, and the
backbone running once for all samples with output-only injection."""

import math

import pytest
import torch

import softmix
from softmix import SMD, NoiseSchedule, reference
from softmix.nets import MLPDenoiser

from _tiny_models import CountingMLP


def test_plain_denoiser_gives_the_ddpm_loss():
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=16, layers=1)
    s = NoiseSchedule(50)
    x0, noise, t = torch.randn(16, 2), torch.randn(16, 2), torch.randint(0, 50, (16,))
    for pt, target in (("epsilon", noise), ("sample", x0)):
        loss = softmix.training_loss(net, s, x0, t=t, noise=noise, prediction_type=pt)
        x_t = s.add_noise(x0, noise, t)
        expected = (net(x_t, t) - target).square().mean()
        torch.testing.assert_close(loss, expected)
    loss = softmix.training_loss(net, s, x0, t=t, noise=noise, prediction_type="v_prediction")
    a = s.alphas_cumprod[t].unsqueeze(1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(loss, (net(s.add_noise(x0, noise, t), t) - v).square().mean())


def test_smd_loss_equals_the_reference_bound_for_fixed_eta():
    torch.manual_seed(0)
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4)
    torch.nn.init.normal_(model.heads[1].w_out.weight)
    s = NoiseSchedule(50)
    b, m = 8, 3
    x0, noise, t = torch.randn(b, 2), torch.randn(b, 2), torch.randint(0, 50, (b,))
    eta = torch.randn(m * b, 2)
    x_t = s.add_noise(x0, noise, t)
    preds = torch.stack([model(x_t, t, eta=eta[i * b:(i + 1) * b]) for i in range(m)])  # (M, B, F)
    for bound in ("jensen", "logmeanexp"):
        loss = softmix.training_loss(model, s, x0, num_samples=m, bound=bound, t=t, noise=noise, eta=eta,
                                     temperature=0.5)
        expected = reference.mc_loss(preds, noise, torch.ones(b), bound, 0.5).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the importance-weighted bound is never above the Jensen bound
    kw = dict(num_samples=m, t=t, noise=noise, eta=eta, reduction="none")
    assert torch.all(softmix.training_loss(model, s, x0, bound="logmeanexp", **kw)
                     <= softmix.training_loss(model, s, x0, bound="jensen", **kw) + 1e-6)


def test_clean_bound_is_the_monte_carlo_likelihood_of_x0_for_smd_and_plain_models():
    """``"clean"`` for ``M`` samples of eta: ``-log mean_m N(x0; x0_m, s^2 I)`` up to ``(F / 2)
    log(2 pi s^2)``; for a plain denoiser (``M = 1``): ``|x0 - x0_hat|^2 / (2 s^2)``, float64."""
    torch.manual_seed(4)
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4, inject="output")
    torch.nn.init.normal_(model.heads[0].w_out.weight)
    s = NoiseSchedule(20)
    b, m, width = 8, 3, 0.5
    x0, noise, t = torch.randn(b, 2), torch.randn(b, 2), torch.randint(0, 20, (b,))
    eta = torch.randn(m * b, 2)
    loss = softmix.training_loss(model, s, x0, num_samples=m, bound="clean", clean_width=width, clean_huber=0.0,
                                 t=t, noise=noise, eta=eta, reduction="none")
    ref = model.double()
    a = s.alphas_cumprod.double()[t].unsqueeze(1)
    x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    with torch.no_grad():
        eps_m = torch.stack([ref(x_t, t, eta=eta[i * b:(i + 1) * b].double()) for i in range(m)])  # (M, B, F)
    x0_m = (x_t - (1 - a).sqrt() * eps_m) / a.sqrt()
    log_lik = torch.distributions.Normal(x0_m, width).log_prob(x0.double()).sum(-1)  # (M, B)
    const = math.log(2 * math.pi * width**2)  # (F / 2) log(2 pi s^2) with F = 2
    expected = -(torch.logsumexp(log_lik, 0) - math.log(m)) - const
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=1e-5)

    net = MLPDenoiser(2, hidden=16, layers=1)
    loss = softmix.training_loss(net, s, x0, bound="clean", clean_width=width, clean_huber=0.0, t=t, noise=noise,
                                 prediction_type="sample", reduction="none")
    with torch.no_grad():
        x0_hat = net.double()(x_t, t)
    torch.testing.assert_close(loss.double(), (x0_hat - x0.double()).square().sum(-1) / (2 * width**2),
                               rtol=2e-4, atol=1e-6)


def test_output_only_injection_runs_the_backbone_once():
    net = CountingMLP()
    model = SMD(net, latent_dim=4, inject="output", in_channels=2)
    assert model.output_only
    x0 = torch.randn(8, 2)
    loss = softmix.training_loss(model, NoiseSchedule(20), x0, num_samples=5)
    loss.backward()
    assert net.backbone_calls == [8], "one backbone pass over the B examples, not M * B"
    assert model.heads[0].w_out.weight.grad is not None


def test_input_and_output_injection_batches_the_samples():
    net = CountingMLP()
    model = SMD(net, latent_dim=4, inject=["inp", "out"], in_channels=2)
    assert not model.output_only
    softmix.training_loss(model, NoiseSchedule(20), torch.randn(8, 2), num_samples=5)
    assert net.backbone_calls == [40], "the M samples are batched: one pass over M * B"


def test_fan_out_equals_separate_calls():
    """The output-only fast path computes what M separate forward passes compute."""
    torch.manual_seed(0)
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4, inject="output")
    torch.nn.init.normal_(model.heads[0].w_out.weight)
    x, t, eta = torch.randn(6, 2), torch.randint(0, 20, (6,)), torch.randn(18, 2)
    fan = model(x, t, eta=eta)
    separate = torch.cat([model(x, t, eta=eta[i * 6:(i + 1) * 6]) for i in range(3)])
    torch.testing.assert_close(fan, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bound", ["jensen", "logmeanexp"])
def test_both_bounds_train(bound):
    torch.manual_seed(0)
    from softmix.data import gmm

    data = gmm("ring").sample(512, torch.Generator().manual_seed(0))
    model = SMD(MLPDenoiser(2, hidden=64, layers=2), latent_dim=8)
    s = NoiseSchedule(20)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        loss = softmix.training_loss(model, s, data[torch.randint(0, 512, (128,), generator=g)],
                                     num_samples=4, bound=bound, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"{bound}: loss did not go down ({first:.3f} -> {last:.3f})"


def test_seeded_loss_is_reproducible_and_validates_arguments():
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4)
    s, x0 = NoiseSchedule(20), torch.randn(4, 2)
    a = softmix.training_loss(model, s, x0, generator=torch.Generator().manual_seed(3))
    b = softmix.training_loss(model, s, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bound"):
        softmix.training_loss(model, s, x0, bound="elbo")
    with pytest.raises(ValueError, match="num_samples"):
        softmix.training_loss(model, s, x0, num_samples=0)
    with pytest.raises(ValueError, match="eta"):
        softmix.training_loss(model, s, x0, num_samples=2, eta=torch.randn(4, 2))
