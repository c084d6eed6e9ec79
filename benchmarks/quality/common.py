"""Shared pieces of the quality experiments: model variants, the training loop, sampling,
aggregation over seeds, and markdown tables.

A *variant* is written as ``name`` or ``name:key=value,key=value`` on the command line, e.g.
``smd:bound=posterior,M=16`` or ``plain:hidden=136``. Keys (see ``Variant``):

- ``smd`` (0/1), ``bound`` (``jensen`` | ``logmeanexp`` | ``posterior`` | ``clean``, with ``width``
  its component width | ``elbo``: the per-step
  conditional VAE of ``softmix.posterior``, with ``klw`` its KL weight), ``M`` (Monte Carlo
  samples of eta), ``temp`` (temperature), ``minvar`` (the ``posterior`` bound's variance floor);
- ``inject`` (``output`` | ``auto`` = input and output), ``latent`` (SMD latent size D),
  ``idh`` (width of the identifier MLP), ``etadim`` (size of eta);
- ``noeta`` (1: eta fixed to zero, so z depends on x_t alone); ``discrete`` (K: eta is one of K
  one-hot codes, a finite mixture; use with ``M=K`` so that training enumerates them);
- ``cat`` (K: ``SMD(identifier="categorical", num_components=K)``, ``softmix.categorical``: K
  learned codes with weights that depend on ``x_t`` and ``t``; training enumerates the K
  components, the exact mixture likelihood at the ``posterior`` sharpness); ``addz`` (1: the head also adds ``B z`` to the
  features, ``h + W_out y + B z``, so components may differ by a constant, not only by a
  modulation of ``h``); ``catlast`` (1: the mixture likelihood only on the last step, ``t = 0``;
  on the others every component regresses the posterior mean, as the plain loss); ``winit``
  (std of the heads' ``W_out`` at init; 0, the library's default, makes a fresh SMD the plain model);
  ``t0frac`` (this share of every batch trained at the last step, ``t = 0``); ``tmid`` (this
  share of every batch at ``t`` uniform in ``[T / 50, T / 10)``, 20-100 at T = 1000, the steps on
  which a long chain decides a sample's mode: the library's ``TrainConfig.timestep_focus``);
  ``wdiv`` (1: the
  mixture weights ``pi_k`` learn from the bound as it is, the likelihood divided by ``k_t``, as
  the library did before 2026-11-29: their gradient ``pi - r`` is then divided by ``k_t``; 0,
  the library's way, gives them that of the likelihood itself); ``lscale`` (1: the logits times a
  learned factor per timestep, ``exp(a(t))``, 1 at init: the true weights' logits at the last
  step of T = 20 are about 30 times as steep in ``x_t`` as at T = 4); ``idff`` (n: the
  identifier's logits see ``n`` random Fourier features of ``x_t``, at the backbone's scale
  ``ffs``, as the backbone does: ``SMD(..., identifier_fourier=n)``; 0, the default: ``x_t``
  alone; vectors only); ``idflat`` (1, with ``cat`` on images: the logits from the identifier's
  features at every position, flattened through one Linear, not averaged over positions: the
  library's ``identifier_grid`` at the features' own size, 4 on 8x8);
  ``sharp`` (f, with ``cat``: the step's sharpness ``k_t`` times ``f``, the components' width
  ``sigma_t`` divided by ``sqrt(f)``, in training only; the temperature ``1 / f`` without its
  factor on the weights' gradient) and ``sharpbelow`` (S: ``sharp`` on the steps ``t < S`` only;
  0: on every step);
  ``grid`` (G, with ``cat`` on images: the library's ``SMD(..., identifier_grid=G)``, the
  features pooled to a G x G grid; at 8x8 with G = 4 the same model as ``idflat``) and ``sharpen``
  / ``sharpsig`` (f / a, with ``bound=posterior``: the library's ``training_loss(...,
  sharpen=f, sharpen_min_signal=a)``, ``k_t`` times ``f`` where ``alpha_bar_t >= a``; at T = 10
  with the default a = 0.3 the steps t < 3, as ``sharp=f,sharpbelow=3``);
  ``ffgate`` (1, with ``idff``: each feature times what the noise of
  ``x_t`` leaves of it, ``exp(-2 pi^2 (1 - alpha_bar_t) |w|^2)``, so that the features are off
  at the noisy steps; implies ``ffsplit``); ``ffsplit`` (1, with ``idff``: the features through
  a Linear of their own, made after the rest of the model, which then starts exactly as without
  features; the library's one Linear on ``concat(x_t, features)`` starts the weights of ``x_t``
  8x smaller in 2-D); ``wt`` (a weight per step on
  each example's loss, outside the bound, so that the mixture likelihood keeps its sharpness:
  ``snr1`` ``1 + SNR_t``, which makes an ``x0`` loss the size of the ``v`` loss; ``snr`` ``SNR_t``,
  the size of the ``eps`` loss; ``min5`` ``min(1 + SNR_t, 5)``; ``SNR_t = alpha_bar_t / (1 -
  alpha_bar_t)``); ``iw`` (a constant weight ``w`` inside the bound: with ``bound=logmeanexp``,
  ``-log sum_k pi_k exp(-w e_k)``, the likelihood of ``x0`` under Gaussians of variance
  ``F / (2 w)`` around the components' ``x0`` predictions: the library's ``bound=clean`` at
  ``width = sqrt(F / (2 w))``); ``xnoise`` (1, with ``pred=sample``: the sampler draws ``x0``
  from ``N(x0_k, width^2 I)``, the "clean" bound's component, instead of taking ``x0_k``);
  ``xlast`` (w > 0, with ``pred=sample``: the same at the last step only, at width ``w``);
  ``xfit`` (1, with ``cat``: the samples drawn with ``softmix.sample(..., final_width=s)``, ``s``
  fitted to 2000 fresh data by ``softmix.loss.fit_final_width``);
  ``xmean`` (with ``cat``: the sampler takes the mixture's mean ``sum_k pi_k x0_k`` instead of
  one drawn component on some steps: ``all``; ``hiS``: the steps ``t >= S``, drawing on the
  last ``S``; ``loS``: ``t < S``); ``wcap`` (1, with ``bound=clean``: the component width at
  step ``t`` is ``min(width, sigma_t)``, ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` the
  noise of ``x_t`` in ``x0`` units: where ``x_t`` pins ``x0`` down more tightly than the width,
  the components must follow it);
- ``hidden``, ``layers``, ``ff``, ``ffs`` (backbone; Fourier features and their scale), ``bs`` (batch size), ``lr``, ``method`` (sampler: ``ddpm`` | ``ddim``),
  ``lrcos`` (1: the learning rate decays to 0 over the run, cosine), ``ema`` (the EMA decay,
  0.995), ``beta2`` (Adam's, 0.999), ``spike`` (f > 1: skip a step whose gradient norm is over
  ``f`` times the running mean of the updates' norms, after 100 steps, and take the 21st in a
  row: the library's ``TrainConfig.skip_spikes``, ``softmix.train.SpikeFilter``), ``floor``
  (c > 0: each example's loss ``L`` becomes ``-log(exp(-L) + exp(-c))``, as if the mixture had
  a flat background component of density ``exp(-c)``: an example that no component covers adds
  at most ``c`` to the loss and nearly no gradient; ``floorfrom`` (n): from training step ``n``
  on), ``tail`` (h: the ``"clean"`` bound's Huber tail at ``h`` widths, ``training_loss(...,
  clean_huber=h)``; 0: off; unset: the library's default, 10 since 2026-11-29, none before: runs
  from before then reproduce with ``tail=0``),
  ``pred`` (what the model predicts: ``epsilon`` | ``sample`` | ``v_prediction`` | ``mixed``:
  ``x0`` on the last step, ``t = 0``, and ``eps`` on the others; for ``plain`` and ``cat``).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

import softmix
from softmix import SMD, NoiseSchedule
from softmix.nets import ConvDenoiser, FourierFeatures, MLPDenoiser
from softmix.categorical import CategoricalIdentifier
from softmix.head import SMDHead, timestep_embedding
from softmix.loss import categorical_bound, gradient_scaled, noised_batch, sharpened_precision, step_precision
from softmix.metrics import mixture_metrics
from softmix.posterior import PosteriorEncoder, elbo_loss
from softmix.train import SpikeFilter

# names used in the tables for the built-in variants
PRESETS = {
    "plain": "smd=0",
    "ddim": "smd=0,method=ddim",
    "smd": "smd=1",  # the library default bound and M
    "paper": "smd=1,bound=jensen,M=1",  # the paper's training: Jensen bound, one eta
}


@dataclass
class Variant:
    name: str
    smd: bool = True
    bound: str | None = None  # None: the library default
    M: int | None = None  # None: the library default
    temp: float = 1.0
    klw: float = 1.0
    minvar: float = softmix.loss.DEFAULT_MIN_VARIANCE
    inject: str = "output"
    latent: int = 16
    etadim: int | None = None  # channels of eta (None: those of x_t)
    idh: int | None = None  # width of the identifier MLP (None: SMD's default)
    noeta: bool = False
    discrete: int = 0  # > 0: eta is one of K one-hot codes (a finite mixture; training enumerates all K)
    cat: int = 0  # > 0: categorical identifier with K learned, x_t-dependent weights (exploration)
    addz: bool = False  # the head adds B z to the features (exploration)
    catlast: bool = False  # cat: the mixture likelihood on the last step only (exploration)
    winit: float = 0.0  # std of the heads' W_out at init (0: the library's zero init)
    t0frac: float = 0.0  # > 0: this share of each batch at t = 0, the rest uniform (exploration)
    tmid: float = 0.0  # > 0: this share of each batch at t in [T / 50, T / 10) (TrainConfig.timestep_focus)
    wdiv: bool = False  # cat: the weights' gradient divided by k_t (the library before 2026-11-29)
    lscale: bool = False  # cat: logits times a learned exp(a(t)) (exploration)
    idff: int = 0  # cat: Fourier features of x_t for the identifier's logits (SMD's identifier_fourier)
    idflat: bool = False  # cat, images: the logits from the features at every position, not their mean (exploration)
    sharp: float = 1.0  # cat: k_t times this in training (exploration)
    sharpbelow: int = 0  # sharp: on the steps t < sharpbelow only (0: every step)
    grid: int = 0  # cat, images: the weights see a G x G grid of positions (SMD's identifier_grid)
    sharpen: float = 1.0  # bound=posterior: k_t times this where alpha_bar_t >= sharpsig (training_loss's sharpen)
    sharpsig: float = softmix.loss.SHARPEN_MIN_SIGNAL  # sharpen: training_loss's sharpen_min_signal
    ffgate: bool = False  # idff: each feature damped by its noise at step t, exp(-2 pi^2 (1 - a_t) |w|^2) (exploration)
    ffsplit: bool = False  # idff: the features through a Linear of their own, x_t's as without features (exploration)
    wt: str = ""  # a per-step weight outside the bound: snr1 | snr | min5 (exploration)
    iw: float = 0.0  # > 0: a constant weight inside the bound (exploration)
    width: float = softmix.loss.DEFAULT_CLEAN_WIDTH  # the "clean" bound's component width
    xnoise: bool = False  # sampling, pred=sample: x0 drawn from N(x0_k, width^2), not x0_k (exploration)
    xfit: bool = False  # sampling, cat: final_width fitted by softmix.loss.fit_final_width
    xlast: float = 0.0  # sampling, pred=sample: > 0, x0 drawn from N(x0_k, xlast^2) at the last step only (exploration)
    wcap: bool = False  # bound=clean: the width capped at the step's own noise in x0 units (exploration)
    xmean: str = ""  # sampling, cat: the mixture's mean x0 on some steps, not a drawn component (exploration)
    hidden: int = 128
    layers: int = 3
    ff: int = 64  # random Fourier features of the input (MLPDenoiser(fourier=...)); 0: none
    ffs: float = 2.0  # their scale
    method: str = "ddpm"
    pred: str = "epsilon"  # prediction_type
    lr: float = 1e-3
    lrcos: bool = False  # the learning rate decays to 0 over the run (cosine) (exploration)
    ema: float = 0.995  # EMA decay of the weights that sample
    beta2: float = 0.999  # Adam's beta2
    spike: float = 0.0  # > 0: skip a step whose gradient norm exceeds this times their running mean (exploration)
    floor: float = 0.0  # > 0: each example's loss L becomes -log(exp(-L) + exp(-floor)) (exploration)
    floorfrom: int = 0  # floor: from this training step on
    tail: float | None = None  # the "clean" bound's Huber tail in widths (clean_huber; None: the library's default)
    bs: int = 256  # batch size
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Variant":
        name, _, spec = text.partition(":")
        base = PRESETS.get(name, "smd=1")
        kv = {}
        for item in filter(None, (base + "," + spec).split(",")):
            k, _, v = item.partition("=")
            kv[k.strip()] = v.strip()
        types = {f.name: f.type for f in fields(cls)}
        out = {}
        for k, v in kv.items():
            if k not in types or k in ("name", "extra"):
                raise ValueError(f"unknown variant key {k!r} in {text!r}")
            if k in ("smd", "noeta", "addz", "catlast", "wdiv", "lscale", "idflat", "xnoise", "wcap", "xfit", "ffgate", "ffsplit", "lrcos"):
                out[k] = v not in ("0", "false", "False", "")
            elif k in ("M", "latent", "hidden", "layers", "idh", "bs", "ff", "etadim", "discrete", "cat", "idff", "floorfrom", "sharpbelow", "grid"):
                out[k] = int(v)
            elif k in ("temp", "minvar", "lr", "klw", "ffs", "winit", "t0frac", "tmid", "iw", "width", "xlast", "ema", "beta2", "spike", "floor", "tail", "sharp", "sharpen", "sharpsig"):
                out[k] = float(v)
            else:
                out[k] = v
        return cls(name=text, **out)


def build_model(v: Variant, sample_shape: tuple[int, ...]) -> nn.Module:
    """The backbone for one example of ``sample_shape``, wrapped in SMD for SMD variants."""
    if len(sample_shape) == 1:
        backbone = MLPDenoiser(sample_shape[0], hidden=v.hidden, layers=v.layers, fourier=v.ff, fourier_scale=v.ffs)
    else:
        backbone = ConvDenoiser(sample_shape[0], hidden=v.hidden, blocks=v.layers, groups=math.gcd(8, v.hidden))
    if not v.smd:
        return backbone
    grid = v.grid
    if v.idflat:
        if not v.cat or len(sample_shape) == 1 or v.grid:
            raise ValueError(f"{v.name}: idflat needs cat and images, and no grid")
        grid = (sample_shape[-1] + 1) // 2  # every position after the stride-2 conv (square images)
    if v.cat:
        split = v.ffsplit or v.ffgate
        if split and not v.idff:
            raise ValueError(f"{v.name}: ffsplit and ffgate need idff")
        model = SMD(backbone, latent_dim=v.latent, inject=v.inject, identifier="categorical", num_components=v.cat,
                    identifier_hidden=v.idh or 128, identifier_fourier=0 if split else v.idff,
                    identifier_fourier_scale=v.ffs, identifier_grid=grid)
        if split:
            add_fourier_layer(model.identifier, v.idff, v.ffs)
    else:
        model = SMD(backbone, latent_dim=v.latent, inject=v.inject, identifier_hidden=v.idh,
                    noise_channels=v.discrete or v.etadim)
    if v.addz:
        for head in model.heads:
            add_latent_bias(head)
    if v.lscale:
        add_logit_scale(model.identifier)
    if v.winit:  # exploration: components differ from the first step (no symmetry to break)
        for head in model.heads:
            nn.init.normal_(head.w_out.weight, std=v.winit)
    if v.discrete:  # exploration: a finite mixture of K components, eta = one-hot code
        def one_hot_eta(x_t, generator=None, num_samples=1, _k=v.discrete):
            b = x_t.shape[0]
            if num_samples == _k:  # training: every component, sample-major (m * B + b)
                idx = torch.arange(_k).repeat_interleave(b)
            else:  # sampling: a random component per example
                idx = torch.randint(0, _k, (num_samples * b,), generator=generator)
            return torch.nn.functional.one_hot(idx, _k).to(x_t.dtype)

        model.sample_eta = one_hot_eta
    if v.noeta:  # ablation: z = g(0, x_t, t), a deterministic function of x_t
        def zero_eta(x_t, generator=None, num_samples=1, _m=model):
            b, *rest = _m.noise_shape(x_t)
            return torch.zeros((num_samples * b, *rest), device=x_t.device, dtype=x_t.dtype)

        model.sample_eta = zero_eta
    return model


def _per_step(t: torch.Tensor, last, other) -> torch.Tensor:
    """``last`` on the examples at ``t = 0``, ``other`` elsewhere (broadcast over features)."""
    return torch.where((t == 0).reshape(-1, *[1] * (other.dim() - 1)), last, other)


def prediction_batch(schedule: NoiseSchedule, x0: torch.Tensor, prediction_type: str, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``noised_batch`` that also knows ``mixed``: ``x0`` the target at ``t = 0``, ``eps`` elsewhere."""
    if prediction_type != "mixed":
        return noised_batch(schedule, x0, prediction_type, generator=gen)
    t, x_t, eps = noised_batch(schedule, x0, "epsilon", generator=gen)
    return t, x_t, _per_step(t, x0, eps)


def precision(schedule: NoiseSchedule, t: torch.Tensor, features: int, prediction_type: str,
              min_variance: float) -> torch.Tensor:
    """``step_precision`` that also knows ``mixed``."""
    if prediction_type != "mixed":
        return step_precision(schedule, t, features, prediction_type, min_variance)
    k_x0, k_eps = (step_precision(schedule, t, features, p, min_variance) for p in ("sample", "epsilon"))
    return _per_step(t, k_x0, k_eps)


def mixed_plain_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, gen: torch.Generator
                     ) -> torch.Tensor:
    """The plain loss with ``pred=mixed``: mean squared error to ``x0`` at ``t = 0``, to ``eps`` elsewhere."""
    t, x_t, target = prediction_batch(schedule, x0, "mixed", gen)
    return (model(x_t, t) - target).square().mean()


class LastStepX0(nn.Module):
    """``pred=mixed`` for the sampler: the network predicts ``x0`` at ``t = 0`` and ``eps``
    elsewhere; this turns the ``x0`` into the ``eps`` it implies, so the chain runs as ``eps``."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self._orig_mod = model  # the name torch.compile uses: softmix's sampler unwraps it to find the SMD model
        self.alpha_bar_0 = float(schedule.alphas_cumprod[0])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self._orig_mod(x_t, t, **kwargs)
        eps = (x_t - math.sqrt(self.alpha_bar_0) * out) / math.sqrt(1 - self.alpha_bar_0)
        return _per_step(t, eps, out)


class MixtureMean(nn.Module):
    """``xmean`` for the sampler: on the chosen steps the mixture's mean output
    ``sum_k pi_k out_k`` (all K components evaluated) in place of the drawn component's."""

    def __init__(self, model: nn.Module, spec: str):
        super().__init__()
        self._orig_mod = model
        if spec == "all":
            self.on = lambda t: torch.ones_like(t, dtype=torch.bool)
        elif spec[:2] in ("hi", "lo"):
            s = int(spec[2:])
            self.on = (lambda t: t >= s) if spec[:2] == "hi" else (lambda t: t < s)
        else:
            raise ValueError(f"xmean: expected all, hiS or loS, got {spec!r}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        drawn = self._orig_mod(x_t, t, **kwargs)
        on = self.on(t)
        if not bool(on.any()):
            return drawn
        kwargs.pop("eta", None)
        b = x_t.shape[0]
        out = self._orig_mod(x_t, t, components=True, **kwargs)
        pi = self._orig_mod.last_log_weights.exp().T  # (K, B)
        mean = (pi.reshape(pi.shape[0], b, *([1] * (out.dim() - 1))) * out.reshape(-1, *drawn.shape)).sum(0)
        return torch.where(on.reshape(b, *([1] * (drawn.dim() - 1))), mean.to(drawn), drawn)


class WidthNoise(nn.Module):
    """``xnoise=1`` for the sampler: the ``x0`` estimate plus ``width`` times standard normal
    noise, a draw from the component ``N(x0_k, width^2 I)`` of the "clean" bound's model."""

    def __init__(self, model: nn.Module, width: float, generator: torch.Generator, last_only: bool = False):
        super().__init__()
        self._orig_mod, self.width, self.generator, self.last_only = model, width, generator, last_only

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self._orig_mod(x_t, t, **kwargs)
        noise = self.width * torch.randn(out.shape, generator=self.generator).to(out)
        return out + (_per_step(t, noise, torch.zeros_like(noise)) if self.last_only else noise)


def categorical_loss(model: SMD, schedule: NoiseSchedule, x0: torch.Tensor, gen: torch.Generator,
                     min_variance: float, prediction_type: str = "epsilon", last_step_only: bool = False,
                     weights_divided: bool = False, sharp: float = 1.0, sharp_below: int = 0) -> torch.Tensor:
    """``softmix.training_loss`` of a categorical SMD (the exact mixture likelihood of the step
    at the ``posterior`` sharpness ``k_t``), extended for four explorations: ``pred=mixed``;
    with ``last_step_only`` the plain loss ``sum_k pi_k e_k`` on the steps ``t > 0`` (minimised
    by every component predicting the posterior mean); with ``weights_divided`` the weights
    learn from the bound itself (their gradient divided by ``k_t``), not from the likelihood as
    ``training_loss`` has them; with ``sharp`` the sharpness ``k_t`` times ``sharp`` on the
    steps ``t < sharp_below`` (every step if 0)."""
    b, num = x0.shape[0], model.identifier.num_components
    t, x_t, target = prediction_batch(schedule, x0, prediction_type, gen)
    pred = model(x_t, t, components=True).reshape(num, *x0.shape)
    log_pi, w = model.last_log_weights.T, torch.ones(b)
    k = precision(schedule, t, x0[0].numel(), prediction_type, min_variance).float()
    if sharp != 1.0:  # t < S is alpha_bar_t >= alpha_bar_{S-1} (alpha_bar falls with t)
        min_signal = float(schedule.alphas_cumprod[sharp_below - 1]) if sharp_below else 0.0
        k = sharpened_precision(schedule, t, k, sharp, min_signal)
    # as training_loss, unless weights_divided: the weights' gradient that of the likelihood
    mixture_log_pi = log_pi if weights_divided else gradient_scaled(log_pi, k)
    mixture = categorical_bound(pred, target, mixture_log_pi, w, "posterior", precision=k)
    if last_step_only:
        mixture = torch.where(t == 0, mixture, categorical_bound(pred, target, log_pi, w, "jensen"))
    return mixture.mean()


class LatentBiasHead(SMDHead):
    """Exploration: the SMD head's modulation plus ``B z`` (``B`` zero at init)."""

    def modulation(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out = super().modulation(h, z)
        rows = self._fit_latent(z.to(out.dtype), h.shape, z.shape[0])
        return out + self._unrows(self.z_bias(rows), out.shape)


def add_latent_bias(head: SMDHead) -> None:
    head.__class__ = LatentBiasHead  # a class, not a patched method, so that deepcopy (EMA) keeps it
    head.z_bias = nn.Linear(head.latent_dim, head.channels, bias=False)
    nn.init.zeros_(head.z_bias.weight)


class ScaledLogitsIdentifier(CategoricalIdentifier):
    """Exploration: the categorical identifier's logits times ``exp(a(t))``, ``a`` learned."""

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = super().logits(x_t, t)
        return out * self.log_scale(timestep_embedding(t, self.time_dim).to(out.dtype)).exp()


def add_logit_scale(identifier: CategoricalIdentifier) -> None:
    identifier.__class__ = ScaledLogitsIdentifier  # a class, so that deepcopy (EMA) keeps it
    identifier.log_scale = nn.Linear(identifier.time_dim, 1)
    nn.init.zeros_(identifier.log_scale.weight)
    nn.init.zeros_(identifier.log_scale.bias)


class SplitFourierIdentifier(CategoricalIdentifier):
    """Exploration (``ffsplit``, ``ffgate``): ``features(x_t) + fourier_proj(sin, cos of x_t)``,
    the Fourier features through a Linear of their own. With ``noise_var`` (``ffgate``: ``1 -
    alpha_bar_t`` per step) each feature is times what the noise of ``x_t`` leaves of it, its
    mean over that noise: ``E_n[sin(2 pi w (x + n))] = sin(2 pi w x) exp(-2 pi^2 s^2 |w|^2)`` for
    ``n ~ N(0, s^2 I)`` (the same for cos)."""

    noise_var: torch.Tensor | None = None

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x_t.flatten(1)
        periodic = self.fourier_features(x)[:, x.shape[1]:]
        if self.noise_var is not None:
            w = self.fourier_features.w.to(x.dtype)
            damping = torch.exp(-2 * torch.pi ** 2 * self.noise_var.to(x)[t][:, None] * w.square().sum(0))
            periodic = periodic * damping.repeat(1, 2)
        h = self.features(x) + self.fourier_proj(periodic)
        return self.logits_net(h + self.time(timestep_embedding(t, self.time_dim).to(h.dtype)))


def add_fourier_layer(identifier: CategoricalIdentifier, n: int, scale: float) -> None:
    """Give an identifier built without features ``n`` of them through a Linear of its own; made
    after the rest of the model, so that the rest starts as without features."""
    identifier.__class__ = SplitFourierIdentifier  # a class, so that deepcopy (EMA) keeps it
    identifier.fourier_features = FourierFeatures(identifier.features.in_features, n, scale, seed=1)
    identifier.fourier_proj = nn.Linear(2 * n, identifier.features.out_features, bias=False)


def loss_weight(kind: str, schedule: NoiseSchedule) -> torch.Tensor | None:
    """The exploration key ``wt``: a weight per timestep ``(T,)``, or None for none."""
    if not kind:
        return None
    a = schedule.alphas_cumprod.double()
    snr = a / (1 - a)
    weights = {"snr1": 1 + snr, "snr": snr, "min5": (1 + snr).clamp(max=5.0)}
    if kind not in weights:
        raise ValueError(f"unknown wt {kind!r}; expected one of {sorted(weights)}")
    return weights[kind].float()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batch_timesteps(v: Variant, schedule: NoiseSchedule, n: int, gen: torch.Generator) -> torch.Tensor:
    """``t (n,)`` for one batch: uniform, but a share ``tmid`` uniform in ``[T / 50, T / 10)``
    (the library's ``sample_timesteps(focus=tmid)``) and a share ``t0frac`` at ``t = 0``."""
    t = schedule.sample_timesteps(n, generator=gen, focus=v.tmid, focus_range=(0.02, 0.1))
    if v.t0frac:
        t = torch.where(torch.rand(n, generator=gen) < v.t0frac, 0, t)
    return t


def train(model: nn.Module, v: Variant, schedule: NoiseSchedule, draw_batch, iters: int, seed: int,
          on_step=None) -> tuple[nn.Module, float]:
    """Adam + gradient clipping + EMA (as ``softmix train``); returns (EMA model, seconds/iter).

    ``on_step(step, ema, loss, grad_norm)``, if given, is called after each step (1-based) with
    the EMA model, the step's loss and its gradient norm before clipping; what it does must leave
    the models' weights as they are (it cannot reach ``gen``)."""
    gen = torch.Generator().manual_seed(seed + 1)
    params = list(model.parameters())
    encoder = None
    if v.smd and v.bound == "elbo":
        encoder = PosteriorEncoder.for_model(model)
        params += list(encoder.parameters())
    opt = torch.optim.Adam(params, lr=v.lr, betas=(0.9, v.beta2))
    # lrcos: lr * (1 + cos(pi s / iters)) / 2 after step s
    lr_decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (1 + math.cos(math.pi * s / iters)) / 2 if v.lrcos else 1.0)
    if v.ffgate:
        model.identifier.noise_var = (1 - schedule.alphas_cumprod).float()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    kw = {}
    if encoder is not None:
        kw = dict(kl_weight=v.klw, min_variance=v.minvar)
    elif v.smd:
        kw = dict(num_samples=v.M, bound=v.bound, temperature=v.temp, min_variance=v.minvar, clean_width=v.width,
                  clean_huber=v.tail, sharpen=v.sharpen, sharpen_min_signal=v.sharpsig)
    kw["prediction_type"] = v.pred
    if v.iw:
        kw["weight"] = lambda t: torch.full(t.shape, v.iw)
    if v.wcap:  # width min(s, sigma_t), sigma_t = sqrt((1 - a_t) / a_t): the clean bound's weight times (s / width)^2
        snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
        kw["weight"] = lambda t: (v.width ** 2 * snr[t]).clamp(min=1.0)
    step_weight = loss_weight(v.wt, schedule)
    if v.sharp != 1.0 and not (v.cat and v.bound == "posterior"):
        raise ValueError(f"{v.name}: sharp needs cat and bound=posterior")
    spikes = SpikeFilter(v.spike)
    t0 = time.perf_counter()
    for step in range(iters):
        x0 = draw_batch(v.bs, gen)
        if encoder is not None:
            loss = elbo_loss(model, encoder, schedule, x0, generator=gen, **kw)
        elif v.cat and (v.catlast or v.wdiv or v.pred == "mixed" or v.sharp != 1.0):
            loss = categorical_loss(model, schedule, x0, gen, v.minvar, v.pred, v.catlast, v.wdiv, v.sharp, v.sharpbelow)
        elif v.pred == "mixed":
            if v.smd:
                raise ValueError(f"{v.name}: pred=mixed is implemented for plain and cat variants only")
            loss = mixed_plain_loss(model, schedule, x0, gen)
        else:
            if v.t0frac or v.tmid:
                kw["t"] = batch_timesteps(v, schedule, x0.shape[0], gen)
            if v.floor and step >= v.floorfrom:
                per_example = softmix.training_loss(model, schedule, x0, generator=gen, reduction="none", **kw)
                loss = -torch.logaddexp(-per_example, per_example.new_tensor(-v.floor)).mean()
            elif step_weight is None:
                loss = softmix.training_loss(model, schedule, x0, generator=gen, **kw)
            else:
                kw["t"] = schedule.sample_timesteps(x0.shape[0], generator=gen)
                per_example = softmix.training_loss(model, schedule, x0, generator=gen, reduction="none", **kw)
                loss = (per_example * step_weight[kw["t"]]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, 1.0).item()
        if not spikes.skip(grad_norm, step + 1):  # a spike: no update, and the running mean does not see it
            opt.step()
            spikes.took(grad_norm)
        lr_decay.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - v.ema)
        if on_step is not None:
            on_step(step + 1, ema, loss.item(), grad_norm)
    if v.spike:
        print(f"{v.name}: {spikes.skips} of {iters} steps skipped as gradient spikes", flush=True)
    return ema, (time.perf_counter() - t0) / max(iters, 1)


def train_on_grid_seed0(v: Variant, schedule: NoiseSchedule, mixture) -> nn.Module:
    """The EMA model of variant ``v`` trained on ``mixture`` (2-D) for 3000 steps with seed 0,
    the same model as ``gmm.py``'s seed 0 (``spread.py`` and ``weights.py`` look inside it)."""
    torch.manual_seed(0)  # initialisation
    ema, _ = train(build_model(v, (2,)), v, schedule, lambda n, g: mixture.sample(n, g), 3000, 0)
    return ema


def draw_samples(model: nn.Module, v: Variant, schedule: NoiseSchedule, shape, seed: int, draw_data=None) -> torch.Tensor:
    """Samples of ``model`` for variant ``v``; ``draw_data(n, generator)`` (the training data's
    sampler) gives the fresh data that ``xfit`` fits the final width to."""
    g = torch.Generator().manual_seed(10_000 + seed)
    pred = v.pred
    if pred == "mixed":
        model, pred = LastStepX0(model, schedule), "epsilon"
    if v.xnoise:
        if pred != "sample":
            raise ValueError(f"{v.name}: xnoise needs pred=sample")
        model = WidthNoise(model, v.width, torch.Generator().manual_seed(20_000 + seed))
    if v.xlast:
        if pred != "sample":
            raise ValueError(f"{v.name}: xlast needs pred=sample")
        model = WidthNoise(model, v.xlast, torch.Generator().manual_seed(20_000 + seed), last_only=True)
    if v.xmean:
        if not v.cat:
            raise ValueError(f"{v.name}: xmean needs cat")
        model = MixtureMean(model, v.xmean)
    final_width = 0.0
    if v.xfit:
        if draw_data is None:
            raise ValueError(f"{v.name}: xfit needs the data")
        x0 = draw_data(2000, torch.Generator().manual_seed(40_000 + seed))
        final_width = softmix.loss.fit_final_width(model, schedule, x0, prediction_type=pred, clean_width=v.width,
                                                   generator=torch.Generator().manual_seed(50_000 + seed))
        print(f"{v.name} seed {seed}: fitted final width {final_width:.4f}", flush=True)
    return softmix.sample(model, schedule, shape, steps=schedule.num_steps, method=v.method, generator=g,
                          prediction_type=pred, progress=False, final_width=final_width)


def mode_shares(x: torch.Tensor, mixture, reference: torch.Tensor, seed: int) -> tuple[float, float]:
    """``(chi2, mmd-shares)``: how unevenly the samples ``x`` fall on the modes, the chi-squared
    statistic of their counts per nearest mode against equal shares (``K - 1`` degrees of
    freedom for data), and the MMD to ``reference`` (as ``mixture_metrics`` has it) of a draw
    from the true modes with those counts, which keeps only how the samples share out over the
    modes."""
    nearest = torch.cdist(x.float(), mixture.means).argmin(1)
    counts = torch.bincount(nearest, minlength=mixture.num_modes).double()
    expected = x.shape[0] / mixture.num_modes
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    same_shares = mixture.means[nearest] + mixture.stds[nearest, None] * noise
    return chi2, mixture_metrics(same_shares, mixture, reference)["mmd"]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    m, s = mean_spread([x * scale for x in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


RESULTS = Path(__file__).resolve().parents[1] / "results"


def add_run_args(p: argparse.ArgumentParser, iters: int, tag: str) -> None:
    """The options of a script that trains one run of one variant on the grid (``trajectory.py``,
    ``spikes.py``): ``--variant --steps --seed --iters --out --tag --threads``."""
    p.add_argument("--variant", required=True)
    p.add_argument("--steps", type=int, default=1000, help="diffusion steps T")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=iters, help="training steps")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=tag)
    p.add_argument("--threads", type=int, default=1, help="torch threads")


def parse_run_args(p: argparse.ArgumentParser, argv=None):
    """``(args, variant, mixture, schedule)`` for ``add_run_args``' options, on the 7x7 grid, with
    ``torch`` set to ``--threads`` threads."""
    from softmix.data import TOY_MIXTURES

    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args, Variant.parse(args.variant), TOY_MIXTURES["gmm"](), NoiseSchedule(args.steps)


def write_report(args: argparse.Namespace, description: str, header: list[str], rows: list[list[str]]) -> None:
    """``<args.out>/<args.tag>.md``: the script's command line, ``description`` and the table; printed too."""
    script = Path(sys.argv[0]).resolve().relative_to(Path(__file__).resolve().parents[2])
    command = f"python {script} " + " ".join(f'"{a}"' if " " in a else a for a in sys.argv[1:])
    text = f"<!-- {command} -->\n\n{description}\n\n" + markdown_table(header, rows)
    out = Path(args.out) / f"{args.tag}.md"
    out.write_text(text)
    print(text + f"\nwrote {out}")
