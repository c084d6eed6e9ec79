"""Output-only injection folds the head into the last layer: ``M`` samples per example
(``SMDHead.through_layer``) and the categorical identifier's ``K`` shared codes
(``SMDHead.through_layer_shared``) give what separate, unfolded forward passes give, values
and gradients, in float64."""

import pytest
import torch
from torch import nn

from softmix import SMD, reference
from softmix.head import SMDHead
from softmix.nets import ConvDenoiser, MLPDenoiser

from _tiny_models import tiny_unet2d


class ReflectConv1d(nn.Module):
    """A 1-D denoiser whose last conv pads by reflection and has a stride and a dilation."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv1d(2, 6, 3, padding=1)
        self.conv_out = nn.Conv1d(6, 2, 3, padding=2, dilation=2, padding_mode="reflect")

    def forward(self, x, t):
        return self.conv_out(torch.tanh(self.conv_in(x) + t.reshape(-1, 1, 1) / 10))


class GroupedOut(nn.Module):
    """A last conv of two groups: not folded (its weight is not one C_out x C map)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_out = nn.Conv2d(4, 2, 3, padding=1, groups=2)

    def forward(self, x, t):
        return self.conv_out(torch.tanh(self.conv_in(x) + t.reshape(-1, 1, 1, 1) / 10))


def _unet():
    net = tiny_unet2d()
    return lambda x, t: net(x, t).sample, net


BACKBONES = {
    "mlp": (lambda: MLPDenoiser(3, hidden=16, layers=2, fourier=4), (5, 3)),
    "conv2d": (lambda: ConvDenoiser(1, hidden=8, blocks=1, groups=4), (3, 1, 6, 5)),
    "reflect-conv1d": (ReflectConv1d, (4, 2, 9)),
    "grouped": (GroupedOut, (3, 2, 4, 4)),
    "unet2d": (lambda: tiny_unet2d(), (2, 1, 8, 8)),
}


def _model(kind: str, identifier=None, k: int = 4) -> tuple[SMD, torch.Tensor, torch.Tensor]:
    pytest.importorskip("diffusers") if kind == "unet2d" else None
    make, shape = BACKBONES[kind]
    torch.manual_seed(0)
    model = SMD(make(), latent_dim=5, inject="output", identifier=identifier, num_components=k).double()
    nn.init.normal_(model.heads[0].w_out.weight, std=0.5)  # components differ from the start
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.randint(0, 50, (shape[0],))
    return model, x, t


def _out(y):
    return y.sample if hasattr(y, "sample") else y


def _grads(model: SMD, out: torch.Tensor, probe: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * probe).sum(), params, allow_unused=True)
    return {n: g for (n, _), g in zip(model.named_parameters(), grads) if g is not None}


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_samples_fold_into_the_last_layer(kind):
    model, x, t = _model(kind)
    b, m = x.shape[0], 3
    assert model.heads[0].folds_into(model._last_layer()) == (kind != "grouped")
    eta = model.sample_eta(x, num_samples=m).double()
    fan = _out(model(x, t, eta=eta))
    separate = torch.cat([_out(model(x, t, eta=eta[i * b:(i + 1) * b])) for i in range(m)])  # one eta each: unfolded
    torch.testing.assert_close(fan, separate, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(fan)  # a fresh direction, so every gradient is checked
    got, expected = _grads(model, fan, probe), _grads(model, separate, probe)
    assert got.keys() == expected.keys() and any("heads.0.w_out" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-11, msg=name)


def _forcing_eta(k: int, num: int, b: int) -> torch.Tensor:
    """``eta (B, K)`` whose Gumbel noise picks component ``k`` whatever the logits."""
    eta = torch.full((b, num), -8.0, dtype=torch.float64)
    eta[:, k] = 8.0
    return eta


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_categorical_components_fold_into_the_last_layer(kind):
    k = 4
    model, x, t = _model(kind, identifier="categorical", k=k)
    nn.init.normal_(model.identifier.codes.weight)
    b = x.shape[0]
    components = _out(model(x, t, components=True))  # (K * B, ...) component-major
    one_by_one = torch.cat([_out(model(x, t, eta=_forcing_eta(i, k, b))) for i in range(k)])
    torch.testing.assert_close(components, one_by_one, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(components)
    got = _grads(model, components, probe)
    expected = _grads(model, one_by_one, probe)
    assert "identifier.codes.weight" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-11, msg=name)


def test_transform_matrices_are_the_latent_transform():
    torch.manual_seed(1)
    head = SMDHead(channels=7, latent_dim=6, hyper_layers=3).double()
    nn.init.normal_(head.c)
    latents = torch.randn(4, 6, dtype=torch.float64)
    mats = head.transform_matrices(latents)  # (K, D, D)
    r = torch.randn(4, 6, dtype=torch.float64)
    v = head.hyper(latents).reshape(4, 3, 6).transpose(0, 1)
    expected = reference.latent_transform(r, v, torch.nn.functional.softplus(head.c))
    torch.testing.assert_close(torch.einsum("kde,ke->kd", mats, r), expected, rtol=1e-12, atol=1e-12)


def test_a_head_with_its_own_modulation_is_not_folded():
    class Shifted(SMDHead):
        def modulation(self, h, z):
            return super().modulation(h, z) + 1.0

    model, x, t = _model("mlp")
    model.heads[0].__class__ = Shifted
    assert not model.heads[0].folds_into(model._last_layer())
    eta = model.sample_eta(x, num_samples=2).double()
    fan = model(x, t, eta=eta)
    separate = torch.cat([model(x, t, eta=eta[i * x.shape[0]:(i + 1) * x.shape[0]]) for i in range(2)])
    torch.testing.assert_close(fan, separate)
