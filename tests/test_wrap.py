"""SMD wraps any denoiser: identity at initialisation, same signature and output type,
eta-dependent after training, and host pipelines keep working."""

import copy

import pytest
import torch
from torch import nn

import softmix
from softmix import SMD, NoiseSchedule, find_injection_points
from softmix.nets import ConvDenoiser, MLPDenoiser

from _tiny_models import import_denoising_diffusion_pytorch, tiny_unet2d, tiny_unet2d_condition


def _train(model, schedule, x0, steps=5, lr=1e-2, **kwargs):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = softmix.training_loss(model, schedule, x0, num_samples=2, **kwargs)
        opt.zero_grad()
        loss.backward()
        head_grads = [p.grad for n, p in model.named_parameters() if n.startswith(("heads", "identifier"))]
        assert all(g is None or torch.isfinite(g).all() for g in head_grads)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # after a few steps every head parameter has received a non-zero gradient
    assert any(g is not None and g.abs().sum() > 0 for g in head_grads)
    assert model.heads[0].w_in.weight.grad.abs().sum() > 0
    return losses


def _depends_on_eta(model, *args, **kwargs):
    x = args[0]
    e1, e2 = torch.randn(model.noise_shape(x)), torch.randn(model.noise_shape(x))
    with torch.no_grad():
        o1 = softmix.wrap.model_output_tensor(model(*args, eta=e1, **kwargs))
        o1b = softmix.wrap.model_output_tensor(model(*args, eta=e1, **kwargs))
        o2 = softmix.wrap.model_output_tensor(model(*args, eta=e2, **kwargs))
    assert torch.equal(o1, o1b), "the same eta must give the same output"
    assert (o1 - o2).abs().max() > 1e-6, "after training, the output must depend on eta"


def test_default_injection_points():
    assert find_injection_points(MLPDenoiser(2)) == [("in_proj", "output"), ("out_proj", "input")]
    assert find_injection_points(ConvDenoiser(1, 16, 1)) == [("conv_in", "output"), ("conv_out", "input")]
    assert find_injection_points(ConvDenoiser(1, 16, 1), "output") == [("conv_out", "input")]
    assert find_injection_points(ConvDenoiser(1, 16, 1), ["conv_in", "conv_out"]) == [
        ("conv_in", "output"), ("conv_out", "input")]
    assert find_injection_points(ConvDenoiser(1, 16, 1), ["blocks.0.conv1:input"]) == [("blocks.0.conv1", "input")]
    with pytest.raises(ValueError, match="no module named 'conv_nope'"):
        SMD(ConvDenoiser(1, 16, 1), inject=["conv_nope"])
    with pytest.raises(ValueError, match="Conv or Linear"):
        SMD(ConvDenoiser(1, 16, 1), inject=["blocks.0"])


def test_mlp_identity_at_init_then_trains_and_depends_on_eta():
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=32, layers=1)
    x, t = torch.randn(8, 2), torch.randint(0, 50, (8,))
    before = net(x, t)
    model = SMD(net, latent_dim=8)
    assert model.output_only is False
    torch.testing.assert_close(model(x, t), before, atol=0, rtol=0)  # W_out = 0 at init
    _train(model, NoiseSchedule(50), torch.randn(64, 2), steps=5)
    _depends_on_eta(model, x, t)


def test_fresh_eta_per_call():
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4)
    nn.init.normal_(model.heads[1].w_out.weight)
    x, t = torch.randn(4, 2), torch.full((4,), 3)
    with torch.no_grad():
        assert not torch.equal(model(x, t), model(x, t))


def test_unet2d_output_type_identity_and_training():
    unet = tiny_unet2d()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 17])
    with torch.no_grad():
        ref = unet(x, t).sample
    model = SMD(unet, latent_dim=8)
    assert model.injection_points == [("conv_in", "output"), ("conv_out", "input")]
    with torch.no_grad():
        out = model(x, t)
        tup = model(x, t, return_dict=False)
    assert type(out).__name__ == "UNet2DOutput"
    assert isinstance(tup, tuple)
    torch.testing.assert_close(out.sample, ref, atol=1e-6, rtol=0)
    # what pipelines read
    assert model.config.sample_size == 8 and model.config.in_channels == 1
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    sched = NoiseSchedule(20)
    _train(model, sched, torch.randn(4, 1, 8, 8), steps=3)
    _depends_on_eta(model, x, t)
    for method in ("ddpm", "ddim"):
        s = softmix.sample(model, sched, (2, 1, 8, 8), steps=4, method=method, progress=False)
        assert s.shape == (2, 1, 8, 8) and torch.isfinite(s).all()


def test_unet2d_condition_passes_encoder_hidden_states():
    model = SMD(tiny_unet2d_condition(), latent_dim=8)
    sched = NoiseSchedule(20)
    ehs = torch.randn(2, 3, 16)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 9])
    _train(model, sched, torch.randn(2, 4, 8, 8), steps=2, encoder_hidden_states=ehs)
    # the condition matters: outputs differ between two conditions for the same eta
    eta = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = model(x, t, encoder_hidden_states=ehs, eta=eta).sample
        b = model(x, t, encoder_hidden_states=ehs + 1, eta=eta).sample
    assert (a - b).abs().max() > 1e-6
    _depends_on_eta(model, x, t, encoder_hidden_states=ehs)
    for method in ("ddpm", "ddim"):
        s = softmix.sample(model, sched, (2, 4, 8, 8), steps=3, method=method, progress=False,
                           encoder_hidden_states=ehs)
        assert s.shape == (2, 4, 8, 8) and torch.isfinite(s).all()


@pytest.mark.parametrize("pipeline", ["DDPMPipeline", "DDIMPipeline"])
def test_diffusers_pipelines_run_unchanged(pipeline):
    import diffusers

    model = SMD(tiny_unet2d(), latent_dim=8)
    nn.init.normal_(model.heads[1].w_out.weight, std=0.1)
    scheduler_cls = diffusers.DDPMScheduler if pipeline == "DDPMPipeline" else diffusers.DDIMScheduler
    pipe = getattr(diffusers, pipeline)(unet=model, scheduler=scheduler_cls(num_train_timesteps=20))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1)
    assert (images >= 0).all() and (images <= 1).all()


def test_denoising_diffusion_pytorch_gaussian_diffusion_trains():
    ddp = import_denoising_diffusion_pytorch()
    torch.manual_seed(0)
    unet = ddp.Unet(dim=8, dim_mults=(1, 2), channels=1, flash_attn=False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([2, 7])
    with torch.no_grad():
        ref = unet(x, t)
    model = SMD(unet, latent_dim=8)
    assert model.injection_points == [("init_conv", "output"), ("final_conv", "input")]
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref, atol=1e-6, rtol=0)
    # what GaussianDiffusion reads from its model
    assert (model.channels, model.out_dim, model.self_condition) == (1, 1, False)
    assert model.random_or_learned_sinusoidal_cond == unet.random_or_learned_sinusoidal_cond
    diffusion = ddp.GaussianDiffusion(model, image_size=8, timesteps=10, sampling_timesteps=10)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-2)
    for _ in range(3):
        loss = diffusion(torch.rand(4, 1, 8, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert model.heads[1].w_out.weight.abs().sum() > 0  # the head trained
    # and through softmix's own loss and sampler
    sched = NoiseSchedule(10)
    _train(model, sched, torch.randn(4, 1, 8, 8), steps=2)
    _depends_on_eta(model, x, t)
    for method in ("ddpm", "ddim"):
        assert torch.isfinite(softmix.sample(model, sched, (2, 1, 8, 8), steps=3, method=method, progress=False)).all()
    with torch.no_grad():
        assert diffusion.sample(batch_size=2).shape == (2, 1, 8, 8)


def test_deepcopy_rebinds_hooks_to_the_copy():
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4)
    nn.init.normal_(model.heads[1].w_out.weight)
    twin = copy.deepcopy(model)
    nn.init.zeros_(twin.heads[1].w_out.weight)  # the copy's head is the identity again
    x, t, eta = torch.randn(4, 2), torch.full((4,), 3), torch.randn(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t, eta=eta), twin.denoiser(x, t))
        assert not torch.allclose(model(x, t, eta=eta), model.denoiser(x, t))


def test_custom_identifier_and_latent_per_example():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2 * 64, 4)

        def forward(self, eta, x_t, t):
            return self.lin(eta.flatten(1))

    model = SMD(ConvDenoiser(1, 16, 1), latent_dim=4, identifier=Flat(), noise_channels=2)
    x = torch.randn(3, 1, 8, 8)
    assert model.noise_shape(x) == (3, 2, 8, 8)
    loss = softmix.training_loss(model, NoiseSchedule(10), x, num_samples=2)
    loss.backward()
    assert torch.isfinite(loss)


def test_wrapping_twice_is_an_error():
    with pytest.raises(ValueError, match="already wrapped"):
        SMD(SMD(MLPDenoiser(2)))
