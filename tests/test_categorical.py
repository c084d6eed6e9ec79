"""The categorical identifier: Gumbel-max draws, the exact mixture bound, the enumeration of
components through SMD, sampling, checkpoints, and that it learns a bimodal step."""

import json
import math

import pytest
import torch

import softmix
from softmix import SMD, CategoricalIdentifier, NoiseSchedule
from softmix.head import timestep_embedding
from softmix.loss import categorical_bound, fit_final_width, huber_tail, step_precision
from softmix.nets import ConvDenoiser, MLPDenoiser


def _categorical_model(k=3, features=2, seed=0):
    torch.manual_seed(seed)
    model = SMD(MLPDenoiser(features, hidden=16, layers=1, fourier=0), latent_dim=4, inject="output",
                identifier="categorical", num_components=k, identifier_hidden=16)
    torch.nn.init.normal_(model.heads[0].w_out.weight)  # components differ from the start
    return model


def _forcing_eta(k: int, num: int, b: int) -> torch.Tensor:
    """``eta (B, K)`` whose Gumbel noise (+35 at ``k``, -3.6 elsewhere) outweighs any logits here."""
    eta = torch.full((b, num), -8.0, dtype=torch.float64)
    eta[:, k] = 8.0
    return eta


def test_gumbel_max_draws_follow_the_softmax_of_the_logits():
    torch.manual_seed(1)
    ident = CategoricalIdentifier(3, latent_dim=2, num_components=5, hidden=8)
    torch.nn.init.normal_(ident.logits_net[-1].weight, std=1.0)
    x_t, t = torch.randn(1, 3), torch.tensor([7])
    n = 200_000
    k = ident.choose(torch.randn(n, 5), x_t, t)
    freq = torch.bincount(k, minlength=5).double() / n
    p = torch.softmax(ident.logits(x_t, t).double(), -1)[0]
    assert p.min() > 0.02 and p.max() < 0.9  # a non-trivial distribution to test against
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * sigma).all(), (freq, p)
    # and z is the chosen code
    eta = torch.randn(4, 5)
    torch.testing.assert_close(ident(eta, x_t, t), ident.codes.weight[ident.choose(eta, x_t, t)])


@pytest.mark.parametrize("bound", ["posterior", "logmeanexp", "jensen"])
def test_loss_is_the_exact_mixture_bound_in_float64(bound):
    k_num, b = 3, 6
    model = _categorical_model(k_num)
    s = NoiseSchedule(10)
    x0, noise = torch.randn(b, 2), torch.randn(b, 2)
    t = torch.randint(0, 10, (b,))
    w, temp = torch.rand(b) + 0.5, 0.7
    loss = softmix.training_loss(model, s, x0, bound=bound, temperature=temp, t=t, noise=noise, weight=w,
                                 reduction="none")

    # reference: each component through the sampling path (Gumbel-forced eta), in float64
    ref_model = model.double()
    x_t = s.add_noise(x0.double(), noise.double(), t)
    with torch.no_grad():
        e = torch.stack([(ref_model(x_t, t, eta=_forcing_eta(k, k_num, b)) - noise.double()).square().mean(-1)
                         for k in range(k_num)])  # (K, B)
        log_pi = torch.log_softmax(ref_model.identifier.logits(x_t, t), -1).T
    wd = w.double()
    if bound == "jensen":
        expected = wd * (log_pi.exp() * e).sum(0)
    else:
        prec = step_precision(s, t, 2, "epsilon") if bound == "posterior" else torch.ones(b, dtype=torch.float64)
        expected = -(temp / prec) * torch.log((log_pi.exp() * torch.exp(-prec * wd * e / temp)).sum(0))
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("bound", ["posterior", "logmeanexp"])
def test_weights_learn_from_the_likelihood_and_components_from_the_bound(bound):
    """Under "posterior" the logits get the gradient of the step's likelihood, T (pi - r) per
    example; the bound divides that by k_t (1000 at the last step) and would starve them."""
    k_num, b, temp = 4, 8, 0.7
    model = _categorical_model(k_num, seed=3)
    s = NoiseSchedule(10)
    x0, noise = torch.randn(b, 2), torch.randn(b, 2)
    t = torch.tensor([0, 0, 1, 2, 3, 5, 7, 9])
    w = torch.rand(b) + 0.5
    logits_bias = model.identifier.logits_net[-1].bias  # adds to every example's logits
    loss = softmix.training_loss(model, s, x0, bound=bound, temperature=temp, t=t, noise=noise, weight=w)
    grad_logits, = torch.autograd.grad(loss, logits_bias)

    x_t = s.add_noise(x0, noise, t)
    with torch.no_grad():
        pred = model(x_t, t, components=True).reshape(k_num, b, 2).double()
        log_pi = torch.log_softmax(model.identifier.logits(x_t, t).double(), -1)  # (B, K)
    e = (pred - noise.double()).square().mean(-1).T  # (B, K)
    prec = step_precision(s, t, 2, "epsilon").double() if bound == "posterior" else torch.ones(b, dtype=torch.float64)
    r = torch.softmax(log_pi - (prec * w.double()).unsqueeze(1) * e / temp, -1)
    # d/dlogits of -(T / k) log sum_k pi_k exp(-k w e_k / T) is (T / k) (pi - r); "posterior"
    # trains the weights on k times that: the likelihood's
    scale = torch.ones(b, dtype=torch.float64) if bound == "posterior" else 1 / prec
    expected = (temp * scale.unsqueeze(1) * (log_pi.exp() - r)).mean(0)
    assert expected.abs().max() > 1e-3  # the weights have something to learn here
    torch.testing.assert_close(grad_logits.double(), expected, rtol=1e-4, atol=1e-6)


def _x0_estimate(pred, x_t, a, prediction_type):
    """The textbook ``x0`` implied by a prediction, ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``."""
    if prediction_type == "sample":
        return pred
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    return a.sqrt() * x_t - (1 - a).sqrt() * pred  # v = sqrt(a) eps - sqrt(1 - a) x0


@pytest.mark.parametrize("huber", [False, True])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_clean_bound_is_the_mixture_likelihood_of_x0_in_float64(prediction_type, huber):
    """``"clean"``: ``-log sum_k pi_k N(x0; x0_k, s^2 I)`` up to ``(F / 2) log(2 pi s^2)``, with
    ``x0_k`` the ``x0`` each component's prediction implies; with ``clean_huber=h``, a value
    ``L`` over ``L0 = h^2 / 2`` becomes ``2 sqrt(L0 L) - L0``."""
    k_num, b, f, width = 3, 7, 2, 0.4
    model = _categorical_model(k_num, seed=5)
    s = NoiseSchedule(10)
    x0, noise = torch.randn(b, f), torch.randn(b, f)
    t = torch.randint(0, 10, (b,))

    ref = model.double()
    a = s.alphas_cumprod.double()[t].unsqueeze(1)
    x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    with torch.no_grad():
        x0_k = torch.stack([_x0_estimate(ref(x_t, t, eta=_forcing_eta(k, k_num, b)), x_t, a, prediction_type)
                            for k in range(k_num)], 1)  # (B, K, F)
        log_pi = torch.log_softmax(ref.identifier.logits(x_t, t), -1)  # (B, K)
    log_lik = torch.distributions.Normal(x0_k, width).log_prob(x0.double().unsqueeze(1)).sum(-1)  # (B, K)
    expected = -torch.logsumexp(log_pi + log_lik, -1) - 0.5 * f * math.log(2 * math.pi * width**2)
    assert expected.std() > 0.1  # examples differ: not a constant to match by accident
    h = 0.0
    if huber:  # the tail starts at the median: examples on both sides of it
        l0 = float(expected.median())
        h = math.sqrt(2 * l0)
        expected = torch.where(expected > l0, 2 * (l0 * expected).sqrt() - l0, expected)
    model.float()
    loss = softmix.training_loss(model, s, x0, bound="clean", clean_width=width, clean_huber=h,
                                 prediction_type=prediction_type, t=t, noise=noise, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=1e-5)


def test_the_huber_tail_bounds_the_gradient_of_a_far_example():
    """At width 1 a lone component's loss is ``d^2 / 2``: its slope in the distance is ``d``
    inside ``h`` widths and ``h`` beyond, however far."""
    h = 3.0
    for d, slope in [(0.5, 0.5), (2.9, 2.9), (3.1, h), (30.0, h), (3e4, h)]:
        dist = torch.tensor(d, dtype=torch.float64, requires_grad=True)
        huber_tail(dist.square() / 2, h).backward()
        assert math.isclose(float(dist.grad), slope, rel_tol=1e-9), (d, float(dist.grad))
    at = torch.tensor([h * h / 2 - 1e-9, h * h / 2 + 1e-9], dtype=torch.float64)
    assert math.isclose(*huber_tail(at, h).tolist(), rel_tol=1e-9)  # continuous at L0


def test_clean_huber_is_refused_where_it_means_nothing(tmp_path, capsys):
    from softmix.cli import main
    from softmix.train import TrainConfig

    model, x0 = _categorical_model(3), torch.randn(4, 2)
    for h in (-1.0, float("nan"), float("inf"), "ten"):
        with pytest.raises(ValueError, match="clean_huber must be 0 \\(off\\) or a positive number of widths"):
            softmix.training_loss(model, NoiseSchedule(4), x0, bound="clean", clean_huber=h)
        if not isinstance(h, str):
            with pytest.raises(ValueError, match="clean_huber must be 0"):
                TrainConfig(identifier="categorical", clean_huber=h).validate()
    with pytest.raises(ValueError, match="clean_huber applies to the \"clean\" bound only"):
        softmix.training_loss(model, NoiseSchedule(4), x0, bound="posterior", clean_huber=10.0)
    with pytest.raises(ValueError, match="this run's bound is 'posterior'"):
        TrainConfig(clean_huber=10.0).validate()  # the Gaussian identifier's default bound
    TrainConfig(identifier="categorical", clean_huber=10.0).validate()  # "clean" by default there
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--clean-huber", "-1"])
    assert "expected 0 (off) or a number of widths > 0" in capsys.readouterr().err


def test_the_clean_bound_has_its_huber_tail_by_default():
    from dataclasses import asdict

    from softmix.loss import DEFAULT_CLEAN_HUBER
    from softmix.train import TrainConfig

    model, s = _categorical_model(3, seed=2), NoiseSchedule(10)
    x0, noise, t = torch.randn(6, 2), torch.randn(6, 2), torch.randint(0, 10, (6,))
    kw = dict(t=t, noise=noise, prediction_type="sample", reduction="none", clean_width=0.05)
    off = softmix.training_loss(model, s, x0, clean_huber=0.0, **kw)
    assert off.max() > DEFAULT_CLEAN_HUBER**2 / 2  # some examples lie in the tail
    torch.testing.assert_close(softmix.training_loss(model, s, x0, **kw), huber_tail(off, DEFAULT_CLEAN_HUBER))
    # a run saved before the tail existed resumes without it; a new run keeps the default
    assert TrainConfig.from_dict({"identifier": "categorical"}).clean_huber == 0.0
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(TrainConfig())))).clean_huber is None


def test_the_trainer_and_the_command_line_pass_clean_huber_on(tmp_path):
    from softmix.cli import main
    from softmix.train import TrainConfig, Trainer, load_trained

    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--iters", "3", "--batch-size", "32", "--hidden", "16", "--layers", "1",
                 "--identifier", "categorical", "--num-components", "4", "--prediction-type", "sample",
                 "--no-progress", "--clean-huber", "2", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["clean_huber"] == 2.0
    assert load_trained(out)[2].clean_huber == 2.0
    cfg = dict(data="gmm", iters=1, batch_size=32, hidden=16, layers=1, identifier="categorical", num_components=4,
               prediction_type="sample")
    first = [Trainer(TrainConfig(clean_huber=h, **cfg)).train_step() for h in (0.0, 2.0)]
    assert first[1] < first[0]  # the same first batch; its largest losses are cut down


def test_the_default_bound_is_clean_for_a_categorical_identifier_and_posterior_otherwise():
    s, x0, noise = NoiseSchedule(10), torch.randn(6, 2), torch.randn(6, 2)
    t = torch.randint(0, 10, (6,))
    kw = dict(t=t, noise=noise, prediction_type="sample", reduction="none")
    model = _categorical_model(3, seed=6)
    torch.testing.assert_close(softmix.training_loss(model, s, x0, **kw),
                               softmix.training_loss(model, s, x0, bound="clean", **kw))
    assert not torch.allclose(softmix.training_loss(model, s, x0, **kw),
                              softmix.training_loss(model, s, x0, bound="posterior", **kw))
    gaussian = SMD(MLPDenoiser(2, hidden=16, layers=1, fourier=0), latent_dim=4, inject="output")
    torch.nn.init.normal_(gaussian.heads[0].w_out.weight)
    eta = torch.randn(16 * 6, 2)
    torch.testing.assert_close(softmix.training_loss(gaussian, s, x0, eta=eta, **kw),
                               softmix.training_loss(gaussian, s, x0, eta=eta, bound="posterior", **kw))


def test_clean_bound_rejects_a_width_that_is_not_positive():
    model = _categorical_model(3)
    x0 = torch.randn(4, 2)
    for width in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clean_width must be a positive number"):
            softmix.training_loss(model, NoiseSchedule(4), x0, bound="clean", clean_width=width)


def test_equal_weights_give_the_fused_mc_loss():
    torch.manual_seed(2)
    k_num, b = 4, 5
    pred, target = torch.randn(k_num, b, 3), torch.randn(b, 3)
    w = torch.rand(b) + 0.5
    log_pi = torch.full((k_num, b), -math.log(k_num))
    for bound in ("jensen", "logmeanexp"):
        torch.testing.assert_close(categorical_bound(pred, target, log_pi, w, bound, 0.5),
                                   softmix.ops.mc_loss(pred, target, w, bound=bound, temperature=0.5))


def test_gradients_reach_the_codes_the_logits_and_the_backbone():
    model = _categorical_model(4)
    s = NoiseSchedule(4)
    loss = softmix.training_loss(model, s, torch.randn(32, 2), generator=torch.Generator().manual_seed(0))
    loss.backward()
    ident = model.identifier
    for name, p in [("codes", ident.codes.weight), ("logits", ident.logits_net[-1].weight),
                    ("backbone", model.denoiser.net[0].weight if hasattr(model.denoiser, "net") else next(model.denoiser.parameters()))]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_copies_after_a_forward_hold_no_graph():
    import copy
    import pickle

    model = _categorical_model(3)
    x_t, t = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    model(x_t, t, components=True)
    assert model.last_log_weights.grad_fn is not None
    twin = copy.deepcopy(model)  # an EMA copy taken between a forward and the loss
    assert twin.last_log_weights is None
    assert pickle.loads(pickle.dumps(model)).last_log_weights is None
    softmix.training_loss(model, NoiseSchedule(4), torch.randn(4, 2))
    assert model.last_log_weights is None  # the loss takes the log-weights


def test_bad_arguments_name_the_problem():
    model = _categorical_model(3)
    s = NoiseSchedule(4)
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="num_samples must be None or 3"):
        softmix.training_loss(model, s, x0, num_samples=16)
    with pytest.raises(ValueError, match="pass no eta"):
        softmix.training_loss(model, s, x0, eta=torch.randn(12, 3))
    with pytest.raises(ValueError, match=r"eta must be \(M \* B, K\)"):
        model(x0, torch.zeros(4, dtype=torch.long), eta=torch.randn(4, 2))
    with pytest.raises(ValueError, match="unknown identifier"):
        SMD(MLPDenoiser(2, hidden=8, layers=1), identifier="gumbel")
    with pytest.raises(ValueError, match="components=True needs"):
        SMD(MLPDenoiser(2, hidden=8, layers=1))(x0, torch.zeros(4, dtype=torch.long), components=True)
    with pytest.raises(ValueError, match="num_components must be >= 1"):
        CategoricalIdentifier(2, 4, num_components=0)
    with pytest.raises(ValueError, match="unknown bound"):
        categorical_bound(torch.randn(2, 3, 1), torch.randn(3, 1), torch.zeros(2, 3), torch.ones(3), "elbo")


def test_sampling_is_reproducible_and_checkpoints_round_trip(tmp_path):
    model = _categorical_model(5)
    s = NoiseSchedule(6)
    x = softmix.sample(model, s, (64, 2), steps=6, generator=torch.Generator().manual_seed(3), progress=False)
    y = softmix.sample(model, s, (64, 2), steps=6, generator=torch.Generator().manual_seed(3), progress=False)
    assert x.shape == (64, 2) and torch.isfinite(x).all()
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert model.sample_eta(x).shape == (64, 5)

    model.save_pretrained(tmp_path / "cat")
    loaded = SMD.from_pretrained(tmp_path / "cat", denoiser=MLPDenoiser(2, hidden=16, layers=1, fourier=0))
    assert loaded.categorical and loaded.identifier.num_components == 5
    x_t, t, eta = torch.randn(8, 2), torch.randint(0, 6, (8,)), torch.randn(8, 5)
    torch.testing.assert_close(loaded(x_t, t, eta=eta), model(x_t, t, eta=eta))


def test_images_one_latent_per_example():
    torch.manual_seed(0)
    model = SMD(ConvDenoiser(1, hidden=8, blocks=1, groups=4), latent_dim=4, identifier="categorical",
                num_components=3, identifier_hidden=8)
    for head in model.heads:  # W_out starts at zero: no gradient would reach the codes in the first step
        torch.nn.init.normal_(head.w_out.weight)
    s = NoiseSchedule(4)
    x0 = torch.randn(5, 1, 8, 8)
    loss = softmix.training_loss(model, s, x0, generator=torch.Generator().manual_seed(0), reduction="none")
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.identifier.codes.weight.grad.abs().sum() > 0
    x = softmix.sample(model, s, (3, 1, 8, 8), steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_learns_a_bimodal_last_step_that_the_plain_model_cannot():
    """Data on {-1, +1}, two steps, x0 prediction: q(x_0 | x_1) is two points, which the
    plain model's one Gaussian averages and the two-component mixture represents."""
    s = NoiseSchedule(2)
    results = {}
    for name in ("plain", "categorical"):
        torch.manual_seed(0)
        net = MLPDenoiser(1, hidden=32, layers=2, fourier=0)
        model = net if name == "plain" else SMD(net, latent_dim=4, inject="output", identifier="categorical",
                                                num_components=2, identifier_hidden=32)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(400):
            x0 = torch.randint(0, 2, (128, 1), generator=g).float() * 2 - 1
            loss = softmix.training_loss(model, s, x0, prediction_type="sample", generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x = softmix.sample(model, s, (2000, 1), steps=2, prediction_type="sample",
                           generator=torch.Generator().manual_seed(2), progress=False)
        results[name] = ((x.abs() - 1).abs() < 0.1).double().mean().item()
    assert results["categorical"] > 0.9, results
    assert results["plain"] < 0.6, results


def test_compiled_loss_matches_eager():
    model = _categorical_model(4)
    s = NoiseSchedule(10)
    x0, t, noise = torch.randn(8, 2), torch.randint(0, 10, (8,)), torch.randn(8, 2)
    eager = softmix.training_loss(model, s, x0, t=t, noise=noise, reduction="none")
    compiled = softmix.training_loss(torch.compile(model), s, x0, t=t, noise=noise, reduction="none")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_cli_trains_samples_and_resumes_a_categorical_model(tmp_path):
    from softmix.cli import main
    from softmix.train import load_trained

    tiny = ["--iters", "10", "--batch-size", "32", "--num-steps", "4", "--hidden", "16", "--layers", "1",
            "--latent-dim", "4", "--num-data", "256", "--no-progress"]
    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--identifier", "categorical", "--num-components", "6", "--out", str(out),
                 "--identifier-fourier", "8", *tiny]) == 0
    model, schedule, cfg, shape = load_trained(out)
    assert model.categorical and model.identifier.num_components == 6 and cfg.identifier == "categorical"
    assert cfg.identifier_fourier == 8 and model.identifier.fourier_features.n == 8
    assert main(["sample", "--checkpoint", str(out), "--num", "32", "--steps", "4", "--out", str(tmp_path / "s.pt"),
                 "--no-progress"]) == 0
    x = torch.load(tmp_path / "s.pt")
    assert x.shape == (32, 2) and torch.isfinite(x).all()
    assert main(["train", "--data", "gmm", "--identifier", "categorical", "--num-components", "6", "--out", str(out),
                 "--identifier-fourier", "8", "--resume", *tiny[:1], "20", *tiny[2:]]) == 0
    assert load_trained(out)[0].identifier.num_components == 6


def test_vector_weights_see_random_fourier_features_of_x_t_in_float64():
    torch.manual_seed(0)
    ident = CategoricalIdentifier(3, 4, num_components=5, hidden=8, fourier=6, fourier_scale=1.5).double()
    x_t, t = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 50, (7,))
    # the textbook map with its own draw of W (seed 1, N(0, 1.5^2)), not the module's buffer
    w = (torch.randn(3, 6, generator=torch.Generator().manual_seed(1)) * 1.5).double()  # drawn in float32
    proj = 2 * math.pi * x_t @ w
    feats = torch.cat([x_t, proj.sin(), proj.cos()], dim=1)
    h = ident.features(feats) + ident.time(timestep_embedding(t, ident.time_dim).double())
    torch.testing.assert_close(ident.logits(x_t, t), ident.logits_net(h), rtol=1e-12, atol=1e-12)
    # W is not saved: a rebuilt identifier has the same one
    rebuilt = CategoricalIdentifier(3, 4, num_components=5, hidden=8, fourier=6, fourier_scale=1.5)
    assert "fourier_features.w" not in rebuilt.state_dict()
    torch.testing.assert_close(rebuilt.fourier_features.w.double(), w)


def test_fourier_features_are_an_option_for_vectors_and_bad_values_are_rejected():
    assert SMD(MLPDenoiser(2, hidden=8, layers=1), identifier="categorical").identifier.fourier_features is None
    assert SMD(MLPDenoiser(2, hidden=8, layers=1), identifier="categorical",
               identifier_fourier=64).identifier.fourier_features.n == 64
    with pytest.raises(ValueError, match=r"0 for images \(spatial_dims 2\)"):
        SMD(ConvDenoiser(1, hidden=8, blocks=1, groups=4), identifier="categorical", num_components=3,
            identifier_fourier=4)
    with pytest.raises(ValueError, match="identifier_fourier=8 needs identifier='categorical'"):
        SMD(MLPDenoiser(2, hidden=8, layers=1), identifier_fourier=8)
    with pytest.raises(ValueError, match=r"fourier must be >= 0, and 0 for images \(spatial_dims 2\)"):
        CategoricalIdentifier(1, 4, num_components=3, spatial_dims=2, fourier=4)
    with pytest.raises(ValueError, match="fourier must be >= 0"):
        CategoricalIdentifier(2, 4, num_components=3, fourier=-1)
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fourier_scale must be a positive finite number"):
            CategoricalIdentifier(2, 4, num_components=3, fourier=4, fourier_scale=scale)


def test_checkpoints_keep_the_identifier_features_and_old_ones_load_without(tmp_path):
    x_t, t, eta = torch.randn(8, 2), torch.randint(0, 6, (8,)), torch.randn(8, 5)
    for n in (7, 0):
        torch.manual_seed(n)
        model = SMD(MLPDenoiser(2, hidden=16, layers=1, fourier=0), latent_dim=4, inject="output",
                    identifier="categorical", num_components=5, identifier_fourier=n, identifier_fourier_scale=0.5)
        model.save_pretrained(tmp_path / f"f{n}")
        loaded = SMD.from_pretrained(tmp_path / f"f{n}", denoiser=MLPDenoiser(2, hidden=16, layers=1, fourier=0))
        assert (loaded.identifier.fourier_features.n if n else 0) == n
        torch.testing.assert_close(loaded(x_t, t, eta=eta), model(x_t, t, eta=eta))
    # a checkpoint written before the identifier had Fourier features: its config lacks the keys
    path = tmp_path / "f0" / "smd_config.json"
    config = json.loads(path.read_text())
    del config["smd"]["identifier_fourier"], config["smd"]["identifier_fourier_scale"]
    path.write_text(json.dumps(config))
    old = SMD.from_pretrained(tmp_path / "f0", denoiser=MLPDenoiser(2, hidden=16, layers=1, fourier=0))
    assert old.identifier.fourier_features is None
    torch.testing.assert_close(old(x_t, t, eta=eta), model(x_t, t, eta=eta))


def test_train_config_passes_the_identifier_features_and_defaults_to_none():
    from softmix.train import TrainConfig, build_model

    cfg = TrainConfig(identifier="categorical", num_components=4, hidden=8, layers=1, latent_dim=4,
                      identifier_fourier=5, fourier_scale=3.0)
    ident = build_model(cfg, (2,)).identifier
    assert ident.fourier_features.n == 5 and ident.fourier_features.scale == 3.0
    assert TrainConfig.from_dict({"identifier": "categorical"}).identifier_fourier == 0
    assert build_model(TrainConfig(identifier="categorical", hidden=8, layers=1), (2,)).identifier.fourier_features is None
    with pytest.raises(ValueError, match="identifier_fourier must be >= 0, got -2"):
        TrainConfig(identifier_fourier=-2).validate()
    with pytest.raises(ValueError, match="identifier_fourier=8 needs identifier='categorical'"):
        TrainConfig(identifier_fourier=8).validate()
    for width in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clean_width must be a positive number"):
            TrainConfig(clean_width=width).validate()


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_fit_final_width_maximises_the_last_steps_likelihood(prediction_type):
    """Against a direct maximisation of ``sum_b log sum_k pi_k N(x0_b; x0_k, s^2 I)`` over ``s``
    (float64, ``torch.distributions.Normal``, scipy's bounded scalar search), with the ``x0_k``
    computed from the textbook inverse of the forward process."""
    from scipy.optimize import minimize_scalar

    model = _categorical_model(4, seed=3)
    s = NoiseSchedule(50)
    x0 = torch.randn(300, 2) * 0.5 + torch.randint(0, 2, (300, 1)) * 2.0 - 1.0
    width = fit_final_width(model, s, x0, steps=5, prediction_type=prediction_type,
                            generator=torch.Generator().manual_seed(7))
    t_last = int(s.respace(5)[0][-1])
    assert t_last > 0  # the last step of a respaced chain, not t = 0
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    a = s.alphas_cumprod.double()[t_last]
    x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
    with torch.no_grad():
        out = model(x_t, torch.full((300,), t_last), components=True).reshape(4, 300, 2).double()
    log_pi = model.last_log_weights.double().T  # (K, B)
    x0_k = out if prediction_type == "sample" else (x_t.double() - (1 - a).sqrt() * out) / a.sqrt()

    def nll(log_s):
        comp = torch.distributions.Normal(x0_k, math.exp(log_s)).log_prob(x0.double()).sum(-1)  # (K, B)
        return -torch.logsumexp(log_pi + comp, dim=0).sum().item()

    best = minimize_scalar(nll, bounds=(math.log(1e-3), math.log(10.0)), method="bounded", options={"xatol": 1e-10})
    assert math.isclose(width, math.exp(best.x), rel_tol=1e-4), (width, math.exp(best.x))


def test_fit_final_width_rejects_what_it_cannot_fit():
    s, x0 = NoiseSchedule(10), torch.randn(8, 2)
    with pytest.raises(ValueError, match="needs an SMD model with identifier='categorical'"):
        fit_final_width(SMD(MLPDenoiser(2, hidden=8, layers=1), latent_dim=4, inject="output"), s, x0)
    with pytest.raises(ValueError, match="clean_width must be a positive number"):
        fit_final_width(_categorical_model(3), s, x0, clean_width=0.0)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        fit_final_width(_categorical_model(3), s, x0, prediction_type="score")
    with pytest.raises(ValueError, match="x0 is empty"):
        fit_final_width(_categorical_model(3), s, x0[:0])


def _adaptive_average(h: torch.Tensor, size: int) -> torch.Tensor:
    """The textbook adaptive average pool of ``h (B, C, H, W)`` to ``size x size``: bin ``i`` of
    ``n`` cells spans ``floor(i n / size)`` to ``ceil((i + 1) n / size)``."""
    def bins(n):
        return [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
    return torch.stack([torch.stack([h[:, :, r0:r1, c0:c1].mean((-2, -1)) for c0, c1 in bins(h.shape[-1])], -1)
                        for r0, r1 in bins(h.shape[-2])], -2)


@pytest.mark.parametrize("size", [8, 10])
def test_image_weights_see_a_grid_of_positions_in_float64(size):
    torch.manual_seed(size)
    ident = CategoricalIdentifier(1, 4, num_components=5, hidden=6, spatial_dims=2, grid=4).double()
    x_t, t = torch.randn(3, 1, size, size, dtype=torch.float64), torch.randint(0, 10, (3,))
    h = ident.features(x_t)  # (3, 6, size / 2, size / 2), rounded up
    flat = _adaptive_average(h, 4).flatten(1)  # channel-major, then rows, then columns
    h = flat @ ident.positions.weight.T + ident.positions.bias
    h = h + ident.time(timestep_embedding(t, ident.time_dim).double())
    torch.testing.assert_close(ident.logits(x_t, t), ident.logits_net(h), rtol=1e-12, atol=1e-12)
    # the same weights for any image size; the average over positions (grid 0) has 6 x 6 x 16 fewer
    assert ident.positions.weight.shape == (6, 6 * 16)
    averaged = CategoricalIdentifier(1, 4, num_components=5, hidden=6, spatial_dims=2)
    assert sum(p.numel() for p in ident.parameters()) - sum(p.numel() for p in averaged.parameters()) == 6 * 6 * 16 + 6


def test_the_grid_is_made_last_so_the_rest_starts_as_without_it():
    """With and without the grid, the same seed gives the same convolutions, codes and logits
    layers: the option changes only how the features reach the logits."""
    models = []
    for grid in (0, 4):
        torch.manual_seed(0)
        models.append(SMD(ConvDenoiser(1, hidden=8, blocks=1, groups=4), latent_dim=4, identifier="categorical",
                          num_components=3, identifier_hidden=8, identifier_grid=grid))
    without, with_grid = (dict(m.named_parameters()) for m in models)
    assert set(with_grid) - set(without) == {"identifier.positions.weight", "identifier.positions.bias"}
    for name, p in without.items():
        torch.testing.assert_close(with_grid[name], p, rtol=0, atol=0)


def test_the_grid_trains_samples_and_round_trips_through_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = SMD(ConvDenoiser(1, hidden=8, blocks=1, groups=4), latent_dim=4, identifier="categorical",
                num_components=3, identifier_hidden=8, identifier_grid=2)
    s, x0 = NoiseSchedule(4), torch.randn(5, 1, 8, 8)
    loss = softmix.training_loss(model, s, x0, bound="posterior", prediction_type="sample", sharpen=5.0,
                                 generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.identifier.positions.weight.grad.abs().sum() > 0
    x = softmix.sample(model, s, (3, 1, 8, 8), steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    model.save_pretrained(tmp_path / "grid")
    loaded = SMD.from_pretrained(tmp_path / "grid", denoiser=ConvDenoiser(1, hidden=8, blocks=1, groups=4))
    assert loaded.identifier.grid == 2
    x_t, t, eta = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,)), torch.randn(4, 3)
    torch.testing.assert_close(loaded(x_t, t, eta=eta), model(x_t, t, eta=eta))


def test_images_default_to_the_grid_and_older_checkpoints_and_runs_to_the_average(tmp_path):
    from softmix.categorical import POSITION_GRID
    from softmix.train import TrainConfig

    conv = lambda: ConvDenoiser(1, hidden=8, blocks=1, groups=4)  # noqa: E731
    assert SMD(conv(), identifier="categorical", num_components=3).identifier.grid == POSITION_GRID == 4
    assert SMD(conv(), identifier="categorical", num_components=3, identifier_grid=0).identifier.grid == 0
    assert SMD(MLPDenoiser(2, hidden=8, layers=1), identifier="categorical").identifier.grid == 0
    assert TrainConfig().identifier_grid is None  # SMD's default
    assert TrainConfig.from_dict({"identifier": "categorical"}).identifier_grid == 0  # a run saved before the grid
    # a checkpoint saved before the grid existed has no key: it loads with the average, as it was trained
    torch.manual_seed(0)
    model = SMD(conv(), latent_dim=4, identifier="categorical", num_components=3, identifier_hidden=8,
                identifier_grid=0)
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "smd_config.json"
    config = json.loads(path.read_text())
    del config["smd"]["identifier_grid"]
    path.write_text(json.dumps(config))
    old = SMD.from_pretrained(tmp_path / "old", denoiser=conv())
    assert old.identifier.grid == 0
    x_t, t, eta = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,)), torch.randn(4, 3)
    torch.testing.assert_close(old(x_t, t, eta=eta), model(x_t, t, eta=eta))


def test_a_grid_needs_a_categorical_identifier_on_images():
    from softmix.train import TrainConfig

    with pytest.raises(ValueError, match=r"grid must be >= 0, and 0 for vectors"):
        CategoricalIdentifier(2, 4, num_components=3, grid=4)
    with pytest.raises(ValueError, match=r"grid must be >= 0"):
        CategoricalIdentifier(1, 4, num_components=3, spatial_dims=2, grid=-1)
    with pytest.raises(ValueError, match="identifier_grid=4 needs identifier='categorical'"):
        SMD(ConvDenoiser(1, hidden=8, blocks=1, groups=4), identifier_grid=4)
    with pytest.raises(ValueError, match="identifier_grid=4 needs images"):
        SMD(MLPDenoiser(2, hidden=8, layers=1), identifier="categorical", identifier_grid=4)
    with pytest.raises(ValueError, match="identifier_grid must be >= 0, got -1"):
        TrainConfig(identifier="categorical", identifier_grid=-1).validate()
    with pytest.raises(ValueError, match="identifier_grid=4 needs identifier='categorical'"):
        TrainConfig(identifier_grid=4).validate()
    TrainConfig(smd=False, identifier="categorical", identifier_grid=4).validate()  # compare's plain model


def _signal_share_of_the_linear_schedule(num_steps: int) -> torch.Tensor:
    """``alpha_bar_t`` of DDPM's linear schedule (1000 steps, beta 1e-4 to 0.02) at every
    ``1000 / num_steps``-th step, in float64: the curve ``NoiseSchedule(num_steps)`` follows."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[[round((i + 1) * 1000 / num_steps) - 1 for i in range(num_steps)]]


@pytest.mark.parametrize("factor", [5.0, 0.5])
def test_sharpen_trains_the_last_steps_at_a_sharper_posterior_in_float64(factor):
    k_num, b, temp = 3, 10, 0.7
    model = _categorical_model(k_num, seed=4)
    s = NoiseSchedule(10)
    x0, noise, t = torch.randn(b, 2), torch.randn(b, 2), torch.arange(10)
    w = torch.rand(b) + 0.5
    loss = softmix.training_loss(model, s, x0, bound="posterior", temperature=temp, t=t, noise=noise, weight=w,
                                 sharpen=factor, reduction="none")

    signal = _signal_share_of_the_linear_schedule(10)
    last = signal >= 0.3
    assert last.tolist() == [True] * 3 + [False] * 7  # t < 3, the steps measured on digits
    ref_model = model.double()
    x_t = s.add_noise(x0.double(), noise.double(), t)
    with torch.no_grad():
        e = torch.stack([(ref_model(x_t, t, eta=_forcing_eta(k, k_num, b)) - noise.double()).square().mean(-1)
                         for k in range(k_num)])
        log_pi = torch.log_softmax(ref_model.identifier.logits(x_t, t), -1).T
    prec = step_precision(s, t, 2, "epsilon").double() * torch.where(last, factor, 1.0)
    expected = -(temp / prec) * torch.log((log_pi.exp() * torch.exp(-prec * w.double() * e / temp)).sum(0))
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=1e-6)
    # the weights learn from the likelihood at the sharpened k_t: T (pi - r) per example
    model.float()
    bias = model.identifier.logits_net[-1].bias
    grad, = torch.autograd.grad(softmix.training_loss(model, s, x0, bound="posterior", temperature=temp, t=t,
                                                      noise=noise, weight=w, sharpen=factor), bias)
    r = torch.softmax(log_pi.T - (prec * w.double()).unsqueeze(1) * e.T / temp, -1)
    torch.testing.assert_close(grad.double(), (temp * (log_pi.T.exp() - r)).mean(0), rtol=1e-4, atol=1e-6)
    # and with min_signal 0 every step is sharpened
    every = softmix.training_loss(model, s, x0, bound="posterior", temperature=temp, t=t, noise=noise, weight=w,
                                  sharpen=factor, sharpen_min_signal=0.0, reduction="none")
    prec = step_precision(s, t, 2, "epsilon").double() * factor
    expected = -(temp / prec) * torch.log((log_pi.exp() * torch.exp(-prec * w.double() * e / temp)).sum(0))
    torch.testing.assert_close(every.double(), expected, rtol=2e-4, atol=1e-6)


def test_sharpen_is_refused_where_it_means_nothing(tmp_path, capsys):
    from softmix.cli import main
    from softmix.train import TrainConfig

    model, x0 = _categorical_model(3), torch.randn(4, 2)
    for f in (0.0, -1.0, float("nan"), float("inf"), "five"):
        with pytest.raises(ValueError, match="sharpen must be a positive number|must be numbers"):
            softmix.training_loss(model, NoiseSchedule(4), x0, bound="posterior", sharpen=f)
    for a in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"sharpen_min_signal must be a share of the signal in \[0, 1\]"):
            softmix.training_loss(model, NoiseSchedule(4), x0, bound="posterior", sharpen=5.0, sharpen_min_signal=a)
    with pytest.raises(ValueError, match="sharpen applies to the \"posterior\" bound only; this run's bound is 'clean'"):
        softmix.training_loss(model, NoiseSchedule(4), x0, sharpen=5.0)  # "clean" by default here
    with pytest.raises(ValueError, match="this run's bound is 'clean'"):
        TrainConfig(identifier="categorical", sharpen=5.0).validate()
    TrainConfig(identifier="categorical", bound="posterior", sharpen=5.0).validate()
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--sharpen", "0"])
    assert "--sharpen" in capsys.readouterr().err


def test_the_command_line_trains_digits_with_the_grid_and_sharpen(tmp_path):
    from softmix.cli import main
    from softmix.train import load_trained

    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--iters", "2", "--batch-size", "16", "--hidden", "8", "--layers", "1",
                 "--num-steps", "10", "--identifier", "categorical", "--num-components", "4",
                 "--prediction-type", "sample", "--bound", "posterior", "--sharpen", "5", "--sharpen-min-signal", "0.5",
                 "--identifier-grid", "4", "--no-progress", "--out", str(out)]) == 0
    model, _, cfg, shape = load_trained(out)
    assert (cfg.sharpen, cfg.sharpen_min_signal, cfg.identifier_grid) == (5.0, 0.5, 4)
    assert shape == (1, 8, 8) and model.identifier.grid == 4
