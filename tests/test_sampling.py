"""sample(): the DDPM and DDIM loops agree with diffusers' schedulers step for step, and
are seeded and reproducible."""

import pytest
import torch
from torch import nn

import softmix
from softmix import SMD, NoiseSchedule
from softmix.nets import MLPDenoiser

diffusers = pytest.importorskip("diffusers")


class Fixed(nn.Module):
    """A deterministic stand-in for a trained denoiser."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        return torch.tanh(x) * self.w + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1) / 1000


def _diffusers_loop(scheduler, model, shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=g)
    for t in scheduler.timesteps:
        out = model(x, torch.full((shape[0],), int(t)))
        kwargs = {"generator": g} if isinstance(scheduler, diffusers.DDPMScheduler) else {"eta": 0.0}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("T, steps", [(10, 10), (20, 5), (1000, 10)])
def test_ddim_matches_diffusers(T, steps):
    s, model = NoiseSchedule(T), Fixed()
    ours = softmix.sample(model, s, (16, 2), steps=steps, method="ddim", generator=torch.Generator().manual_seed(0),
                          progress=False)
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=s.betas.numpy(), clip_sample=False,
                                    set_alpha_to_one=True, timestep_spacing="trailing")
    with torch.no_grad():
        theirs = _diffusers_loop(sched, model, (16, 2), steps, 0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T, steps", [(10, 10), (20, 5)])
def test_ddpm_matches_diffusers_with_the_same_noise(T, steps):
    s, model = NoiseSchedule(T), Fixed()
    ours = softmix.sample(model, s, (16, 2), steps=steps, method="ddpm", generator=torch.Generator().manual_seed(0),
                          progress=False)
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=s.betas.numpy(), clip_sample=False,
                                    variance_type="fixed_small", timestep_spacing="trailing")
    with torch.no_grad():
        theirs = _diffusers_loop(sched, model, (16, 2), steps, 0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible_for_smd():
    torch.manual_seed(0)
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4)
    nn.init.normal_(model.heads[1].w_out.weight)
    s = NoiseSchedule(20)

    def draw(seed, method="ddpm"):
        return softmix.sample(model, s, (32, 2), steps=5, method=method, generator=torch.Generator().manual_seed(seed),
                              progress=False)

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    # DDIM adds no step noise, yet SMD draws a fresh eta per step: still random across seeds
    assert torch.equal(draw(2, "ddim"), draw(2, "ddim"))
    x_T = torch.randn(32, 2)
    a = softmix.sample(model, s, (32, 2), steps=5, method="ddim", x_T=x_T, generator=torch.Generator().manual_seed(0),
                       progress=False)
    b = softmix.sample(model, s, (32, 2), steps=5, method="ddim", x_T=x_T, generator=torch.Generator().manual_seed(1),
                       progress=False)
    assert not torch.equal(a, b), "fresh eta per step must change DDIM samples from the same x_T"


def test_trajectory_clip_and_errors():
    s, model = NoiseSchedule(20), Fixed()
    x, traj = softmix.sample(model, s, (4, 2), steps=4, return_trajectory=True, clip_sample=0.5, progress=False,
                             prediction_type="sample")
    assert len(traj) == 5 and torch.equal(traj[-1], x)
    assert x.abs().max() <= 0.5 + 1e-6  # the last step returns the clipped x0
    with pytest.raises(ValueError, match="larger than"):
        softmix.sample(model, s, (4, 2), steps=21, progress=False)
    with pytest.raises(ValueError, match="method"):
        softmix.sample(model, s, (4, 2), method="euler", progress=False)
    assert model.training, "sample() restores the training mode"


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_final_width_draws_the_sample_around_the_last_estimate(method):
    s, model = NoiseSchedule(20), Fixed()
    x_T = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=5, method=method, x_T=x_T, progress=False, prediction_type="sample")
    centre = softmix.sample(model, s, (20000, 1), generator=torch.Generator().manual_seed(2), **kw)
    same = softmix.sample(model, s, (20000, 1), generator=torch.Generator().manual_seed(2), final_width=0.0, **kw)
    torch.testing.assert_close(same, centre, rtol=0, atol=0)
    x, traj = softmix.sample(model, s, (20000, 1), generator=torch.Generator().manual_seed(2), final_width=0.25,
                             return_trajectory=True, **kw)
    assert torch.equal(traj[-1], x)
    offset = (x - centre).double()  # the chain is unchanged; the offset is 0.25 N(0, 1)
    assert abs(offset.mean().item()) < 4 * 0.25 / 20000**0.5
    assert abs(offset.std().item() / 0.25 - 1) < 0.03
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="final_width must be a finite number >= 0"):
            softmix.sample(model, s, (4, 1), steps=5, final_width=bad, progress=False)
