"""NoiseSchedule against diffusers' schedulers and the textbook formulas."""

import math

import pytest
import torch

from softmix import NoiseSchedule

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "kind, diffusers_name",
    [("linear", "linear"), ("cosine", "squaredcos_cap_v2"), ("sigmoid", "sigmoid")],
)
def test_1000_step_betas_match_diffusers(kind, diffusers_name):
    ours = NoiseSchedule(1000, kind)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name)
    torch.testing.assert_close(ours.betas, theirs.betas, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "sigmoid"])
def test_explicit_betas_match_diffusers_at_any_T(kind):
    ours = NoiseSchedule(10, kind, beta_start=0.001, beta_end=0.2)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=10, beta_schedule=kind, beta_start=0.001, beta_end=0.2)
    torch.testing.assert_close(ours.betas, theirs.betas, atol=1e-6, rtol=1e-5)


def test_cosine_matches_diffusers_at_tiny_T():
    ours = NoiseSchedule(4, "cosine")
    theirs = diffusers.DDPMScheduler(num_train_timesteps=4, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(ours.betas, theirs.betas, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [1, 2, 4, 10, 50])
def test_tiny_T_goes_from_data_to_noise(kind, T):
    s = NoiseSchedule(T, kind)
    a = s.alphas_cumprod
    assert a.shape == (T,)
    assert torch.all(a[1:] < a[:-1]), "alpha_bar must decrease"
    assert torch.all((s.betas > 0) & (s.betas < 1))
    assert a[-1] < 1e-2, f"the last of {T} steps must be (almost) pure noise, alpha_bar_T = {a[-1]}"
    torch.testing.assert_close(a, torch.cumprod(1 - s.betas.double(), 0).float(), rtol=1e-5, atol=1e-7)


def test_linear_T_steps_follow_the_1000_step_curve():
    ref = NoiseSchedule(1000).alphas_cumprod
    s = NoiseSchedule(4)
    torch.testing.assert_close(s.alphas_cumprod, ref[[249, 499, 749, 999]], rtol=1e-4, atol=1e-7)


def test_add_noise_and_targets_follow_the_formulas():
    s = NoiseSchedule(100, "cosine")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 50, 98, 99])
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = s.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    # x_t matches diffusers' add_noise given the same alphas
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    assert torch.equal(s.target(x0, noise, t, "epsilon"), noise)
    assert torch.equal(s.target(x0, noise, t, "sample"), x0)
    v = s.target(x0, noise, t, "v_prediction")
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t), atol=1e-5, rtol=1e-5)
    # v-parameterisation identity: x0 = sqrt(a) x_t - sqrt(1 - a) v
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        s.target(x0, noise, t, "score")


@pytest.mark.parametrize("T, steps", [(1000, 10), (1000, 7), (20, 5), (10, 10), (4, 1)])
def test_respacing_matches_diffusers_trailing(T, steps):
    s = NoiseSchedule(T)
    ddim = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    ts, a_t, a_prev = s.respace(steps)
    assert ts.tolist() == ddim.timesteps.tolist()
    assert ts[0] == T - 1 and len(set(ts.tolist())) == steps
    torch.testing.assert_close(a_t, s.alphas_cumprod[ts])
    assert a_prev[-1] == 1.0 and torch.equal(a_prev[:-1], a_t[1:])


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule(10, "quadratic")
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule(0)
    with pytest.raises(ValueError, match="larger than"):
        NoiseSchedule(10).respace(11)
    with pytest.raises(ValueError, match="timesteps"):
        NoiseSchedule(10).add_noise(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 10]))
    assert NoiseSchedule.from_dict(NoiseSchedule(7, "sigmoid").to_dict()).betas.equal(NoiseSchedule(7, "sigmoid").betas)
