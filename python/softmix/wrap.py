"""``SMD``: wrap any denoiser with the SMD head through forward hooks.

The wrapped denoiser is left as it is; ``SMD`` registers hooks on chosen modules of it, and
its ``forward`` computes ``z = g_xi(eta, x_t, t)`` before calling the denoiser, so the hooks
can modulate the features as they pass. The call signature and the output type of the
denoiser are kept (a diffusers ``UNet2DModel`` still returns ``UNet2DOutput``), and the
attributes host libraries read (``config``, ``channels``, ``self_condition``, ...) are
forwarded to the denoiser, so ``DDPMPipeline(unet=SMD(unet), ...)`` and
``GaussianDiffusion(SMD(unet), ...)`` work unchanged.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch
from torch import nn

from softmix.categorical import DEFAULT_FOURIER_SCALE, DEFAULT_NUM_COMPONENTS, POSITION_GRID, CategoricalIdentifier
from softmix.head import ConvIdentifier, MLPIdentifier, SMDHead

__all__ = ["SMD", "find_injection_points", "model_output_tensor", "is_smd"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_X_NAMES = ("sample", "x", "x_t", "img", "input", "inputs")
_T_NAMES = ("timestep", "timesteps", "t", "time", "times")


def is_smd(model: nn.Module) -> bool:
    """Whether ``model`` is an ``SMD`` (also through DDP / ``torch.compile`` wrappers)."""
    return isinstance(_unwrap(model), SMD)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def model_output_tensor(out: Any) -> torch.Tensor:
    """The prediction tensor in a denoiser's output: a tensor, ``.sample`` or ``out[0]``."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the prediction tensor in a denoiser output of type {type(out).__name__}")


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv layers of an image model, else the Linear layers, in registration order."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONV_TYPES)]
    if convs:
        return convs
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_injection_points(model: nn.Module, inject: str | Sequence = "auto") -> list[tuple[str, str]]:
    """Resolve ``inject`` to a list of ``(module_name, where)``, ``where`` in ``output | input``.

    ``"output"`` means a forward hook that modulates the module's output (features *after*
    it), ``"input"`` a forward pre-hook that modulates its first input (features *before* it).

    ``inject`` may be:

    - ``"auto"`` / ``"both"``: after the first and before the last conv layer (linear layers
      for a model without convs), in registration order (diffusers: ``conv_in`` /
      ``conv_out``; denoising-diffusion-pytorch: ``init_conv`` / ``final_conv``);
    - ``"output"``: only before the last layer (the fast path of ``training_loss``: the
      backbone runs once for all Monte Carlo samples);
    - ``"input"``: only after the first layer;
    - a list of module names. A plain name is hooked after the module, except the last
      conv / linear layer, which is hooked before (its input is the last features); append
      ``":input"`` or ``":output"`` to choose.
    """
    cands = _candidates(model)
    if not cands:
        raise ValueError("SMD: the denoiser has no Conv or Linear layer; pass inject=[module names]")
    first, last = cands[0][0], cands[-1][0]
    if isinstance(inject, str):
        key = inject.lower()
        if key in ("auto", "both"):
            points = [(first, "output"), (last, "input")]
            if first == last:
                points = [(last, "input")]
            return points
        if key == "output":
            return [(last, "input")]
        if key == "input":
            return [(first, "output")]
        inject = [inject]
    modules = dict(model.named_modules())
    points = []
    for item in inject:
        if isinstance(item, (tuple, list)):
            name, where = item
        elif ":" in item:
            name, where = item.rsplit(":", 1)
        else:
            name, where = item, ("input" if item == last else "output")
        if where not in ("input", "output"):
            raise ValueError(f"SMD: injection {item!r}: where must be 'input' or 'output'")
        if name not in modules:
            close = [n for n in modules if name in n][:5]
            raise ValueError(f"SMD: the denoiser has no module named {name!r}" + (f" (did you mean {close}?)" if close else ""))
        points.append((name, where))
    if not points:
        raise ValueError("SMD: inject is empty")
    return points


def _channels_of(module: nn.Module, where: str) -> tuple[int, int]:
    """``(channels, channel_dim)`` of the features at a hook on ``module``."""
    if isinstance(module, _CONV_TYPES):
        return (module.in_channels if where == "input" else module.out_channels), 1
    if isinstance(module, nn.Linear):
        return (module.in_features if where == "input" else module.out_features), -1
    raise ValueError(
        f"SMD: can only inject at Conv or Linear modules (got {type(module).__name__}); "
        "name the conv / linear layer next to it instead"
    )


class _Injection:
    """The hook callable for one injection point. A plain object (not a closure) so that
    ``copy.deepcopy(smd)`` (EMA copies) rebinds it to the copy's state."""

    def __init__(self, owner: "SMD", index: int):
        self.owner = owner
        self.index = index

    def _apply(self, h: torch.Tensor) -> torch.Tensor:
        z = self.owner._latent
        if z is None:  # the denoiser was called directly, not through SMD.forward
            return h
        return self.owner.heads[self.index](h, z)

    def _folded(self, module) -> bool:
        # getattr: an SMD pickled before the attribute existed has none
        return bool(getattr(self.owner, "_fold", None)) and self.owner.heads[self.index].folds_into(module)

    def pre(self, module, args, kwargs):
        if self.owner._latent is None or not args or self._folded(module):
            return None
        return (self._apply(args[0]), *args[1:]), kwargs

    def post(self, module, args, output):
        if self.owner._latent is None:
            return None
        return self._apply(output)

    def after_input(self, module, args, output):
        """After a layer whose input ``pre`` left alone for ``SMDHead.through_layer``."""
        if self.owner._latent is None or not args or not self._folded(module):
            return None
        head = self.owner.heads[self.index]
        through = head.through_layer_shared if self.owner._fold == "shared" else head.through_layer
        return through(module, args[0], self.owner._latent, output)


class SMD(nn.Module):
    """Soft Mixture Denoising around any denoiser.

    ``SMD(denoiser)(x_t, t, ...)`` returns what ``denoiser(x_t, t, ...)`` returns, with the
    features at the injection points modulated by ``z = g_xi(eta, x_t, t)``. A fresh
    ``eta ~ N(0, I)`` is drawn per call unless passed as ``eta=``.

    Args:
        denoiser: a module called as ``denoiser(x_t, t, **kwargs)`` (diffusers ``UNet2DModel``
            / ``UNet2DConditionModel``, ``denoising_diffusion_pytorch.Unet``, your own).
        latent_dim: ``D``, channels of ``z`` and of the head.
        hyper_layers: ``L``, number of rank-one-plus-identity maps in the head.
        inject: where to modulate; see ``find_injection_points`` (default: after the first and
            before the last conv / linear layer).
        identifier: ``g_xi``, a module called as ``identifier(eta, x_t, t) -> z`` of shape
            ``(B, D, *S)`` or ``(B, D)``; by default a small conv net for images, an MLP for
            vectors. ``"categorical"``: a ``CategoricalIdentifier`` with ``num_components``
            codes, a finite mixture whose weights depend on ``x_t`` and ``t`` (trained on the
            exact mixture likelihood, by default of ``x0``; see ``softmix.categorical``).
        in_channels: channels (or features) of ``x_t``; found from the denoiser when left
            ``None`` (``config.in_channels``, ``channels``, ``in_channels``, or the first layer).
        noise_channels: channels (features) of ``eta``; default those of ``x_t``.
        identifier_hidden: width of the default identifier.
        num_components: ``K`` of ``identifier="categorical"``.
        identifier_fourier, identifier_fourier_scale: vectors with ``identifier="categorical"``:
            random Fourier features of ``x_t`` for its weights (``CategoricalIdentifier``'s
            ``fourier``; 0: none). Use ``LONG_CHAIN_FOURIER`` (64) for chains of hundreds of steps.
        identifier_grid: images with ``identifier="categorical"``: its weights see the features
            on a ``G``-per-dimension grid of positions rather than their average
            (``CategoricalIdentifier``'s ``grid``; 0: the average). Default: ``POSITION_GRID``
            (4) for images, 0 for vectors.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        latent_dim: int = 32,
        hyper_layers: int = 2,
        inject: str | Sequence = "auto",
        identifier: nn.Module | str | None = None,
        in_channels: int | None = None,
        noise_channels: int | None = None,
        identifier_hidden: int | None = None,
        num_components: int = DEFAULT_NUM_COMPONENTS,
        identifier_fourier: int = 0,
        identifier_fourier_scale: float = DEFAULT_FOURIER_SCALE,
        identifier_grid: int | None = None,
    ):
        super().__init__()
        if isinstance(denoiser, SMD):
            raise ValueError("the denoiser is already wrapped in SMD")
        self.denoiser = denoiser
        points = find_injection_points(denoiser, inject)
        modules = dict(denoiser.named_modules())
        cands = _candidates(denoiser)
        self._image = isinstance(cands[0][1], _CONV_TYPES) if cands else False
        spatial_dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
        self.heads = nn.ModuleList()
        self._handles = []
        self.injection_points = points
        for i, (name, where) in enumerate(points):
            channels, channel_dim = _channels_of(modules[name], where)
            self.heads.append(SMDHead(channels, latent_dim, hyper_layers, channel_dim))
        for i, (name, where) in enumerate(points):
            inj = _Injection(self, i)
            if where == "input":
                self._handles.append(modules[name].register_forward_pre_hook(inj.pre, with_kwargs=True))
                self._handles.append(modules[name].register_forward_hook(inj.after_input))
            else:
                self._handles.append(modules[name].register_forward_hook(inj.post))

        if in_channels is None:
            in_channels = self._find_in_channels(denoiser, cands)
        self.in_channels_ = in_channels
        self.noise_channels = in_channels if noise_channels is None else noise_channels
        kind = identifier if isinstance(identifier, str) else None
        if kind is not None and kind != "categorical":
            raise ValueError(f"SMD: unknown identifier {kind!r}; pass a module, None or 'categorical'")
        self.custom_identifier = isinstance(identifier, nn.Module)
        spatial = 0
        if self._image:
            conv_type = next(type(m) for _, m in cands)
            spatial = next(v for k, v in spatial_dims.items() if issubclass(conv_type, k))
        if identifier_fourier and kind != "categorical":
            raise ValueError(f"SMD: identifier_fourier={identifier_fourier} needs identifier='categorical'")
        if identifier_grid is None:
            identifier_grid = POSITION_GRID if kind == "categorical" and spatial else 0
        if identifier_grid and kind != "categorical":
            raise ValueError(f"SMD: identifier_grid={identifier_grid} needs identifier='categorical'")
        if identifier_grid and not spatial:
            raise ValueError(f"SMD: identifier_grid={identifier_grid} needs images "
                             "(the denoiser's layers are not convolutions)")
        if kind == "categorical":
            identifier = CategoricalIdentifier(in_channels, latent_dim, num_components, hidden=identifier_hidden or 128,
                                               spatial_dims=spatial, fourier=identifier_fourier,
                                               fourier_scale=identifier_fourier_scale, grid=identifier_grid)
            self.noise_channels = num_components
        elif identifier is None:
            if self._image:
                identifier = ConvIdentifier(
                    in_channels, latent_dim, self.noise_channels, hidden=identifier_hidden or 32, spatial_dims=spatial
                )
            else:
                identifier = MLPIdentifier(in_channels, latent_dim, self.noise_channels, hidden=identifier_hidden or 64)
        self.identifier = identifier
        self.smd_config = {
            "latent_dim": latent_dim,
            "hyper_layers": hyper_layers,
            "inject": [list(p) for p in points],
            "in_channels": in_channels,
            "noise_channels": self.noise_channels,
            "identifier_hidden": identifier_hidden,
            "custom_identifier": self.custom_identifier,
        }
        if kind == "categorical":
            self.smd_config.update(identifier="categorical", num_components=num_components,
                                   identifier_fourier=identifier_fourier,
                                   identifier_fourier_scale=identifier_fourier_scale, identifier_grid=identifier_grid)
        # log pi_k(x_t, t) (B, K) of the last forward(..., components=True): training_loss reads it
        self.last_log_weights: torch.Tensor | None = None
        self._latent: torch.Tensor | None = None
        # how the head folds into the last layer while an output-only fan-out runs: None (it
        # does not), "fanout" (M latents per example: SMDHead.through_layer) or "shared" (the
        # same K latents for every example, _latent (K, D): SMDHead.through_layer_shared)
        self._fold: str | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _find_in_channels(denoiser: nn.Module, cands) -> int:
        cfg = getattr(denoiser, "config", None)
        for source in (cfg, denoiser):
            if source is None:
                continue
            for attr in ("in_channels", "channels"):
                value = source.get(attr) if isinstance(source, dict) else getattr(source, attr, None)
                if isinstance(value, int):
                    return value
        first = cands[0][1]
        return first.in_channels if isinstance(first, _CONV_TYPES) else first.in_features

    @property
    def output_only(self) -> bool:
        """True when the only injection point is before the last layer: ``training_loss`` then
        runs the backbone once and only the head ``M`` times, folded into the last layer when
        that is a plain Linear or Conv (``SMDHead.through_layer``)."""
        if len(self.injection_points) != 1:
            return False
        name, where = self.injection_points[0]
        return where == "input" and name == _candidates(self.denoiser)[-1][0]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def __getattr__(self, name: str):
        # parameters / buffers / submodules first (nn.Module), then what the host library
        # reads from the denoiser (config, channels, out_dim, self_condition, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if name.startswith("__") or name in ("denoiser", "_modules", "_parameters", "_buffers"):
            raise AttributeError(name)
        denoiser = self._modules.get("denoiser")
        if denoiser is None:
            raise AttributeError(name)
        try:
            return getattr(denoiser, name)
        except AttributeError:
            raise AttributeError(f"neither SMD nor the wrapped {type(denoiser).__name__} has attribute {name!r}") from None

    def __getstate__(self):
        # copies (EMA, deepcopy, pickle) leave out the last forward's log-weights: a non-leaf
        # tensor in an autograd graph, which deepcopy refuses
        state = dict(super().__getstate__())
        state["last_log_weights"] = None
        return state

    @property
    def categorical(self) -> bool:
        """Whether the identifier is a ``CategoricalIdentifier`` (a finite mixture with
        ``x_t``-dependent weights, trained on its exact likelihood)."""
        return isinstance(self.identifier, CategoricalIdentifier)

    def noise_shape(self, x_t: torch.Tensor) -> tuple[int, ...]:
        """Shape of ``eta`` for a batch ``x_t``: ``(B, noise_channels, *S)`` (``(B, K)`` for
        a categorical identifier)."""
        if self.categorical:
            return self.identifier.noise_shape(x_t)
        return (x_t.shape[0], self.noise_channels, *x_t.shape[2:])

    def sample_eta(self, x_t: torch.Tensor, generator: torch.Generator | None = None, num_samples: int = 1) -> torch.Tensor:
        """Draw ``eta ~ N(0, I)``: ``(num_samples * B, noise_channels, *S)``."""
        b, *rest = self.noise_shape(x_t)
        gen_device = generator.device if generator is not None else x_t.device
        eta = torch.randn((num_samples * b, *rest), generator=generator, device=gen_device, dtype=torch.float32)
        return eta.to(device=x_t.device, dtype=x_t.dtype)

    @staticmethod
    def _split_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        x = args[0] if args else next((kwargs[k] for k in _X_NAMES if k in kwargs), None)
        if len(args) > 1:
            t = args[1]
        else:
            t = next((kwargs[k] for k in _T_NAMES if k in kwargs), None)
        if not isinstance(x, torch.Tensor) or t is None:
            raise TypeError("SMD forward: call as model(x_t, t, ...) (x_t a tensor, t the timesteps)")
        return x, t

    @staticmethod
    def _batch_t(t: Any, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(x.shape[0])
        return t.reshape(x.shape[0])

    @contextlib.contextmanager
    def _with_latent(self, z: torch.Tensor, fold: str | None = None):
        previous = self._latent, self._fold
        if isinstance(z, nn.Parameter):  # the codes themselves: a view, or nn.Module would register it
            z = z.view_as(z)
        self._latent, self._fold = z, fold
        try:
            yield
        finally:
            self._latent, self._fold = previous

    def latent(self, x_t: torch.Tensor, t: Any, eta: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """``z = g_xi(eta, x_t, t)`` (drawing ``eta`` when not given)."""
        if eta is None:
            eta = self.sample_eta(x_t, generator)
        if eta.shape[0] != x_t.shape[0]:
            raise ValueError(f"SMD: eta has batch {eta.shape[0]}, x_t has {x_t.shape[0]}")
        try:
            return self.identifier(eta, x_t, self._batch_t(t, x_t))
        except RuntimeError as err:
            raise RuntimeError(
                f"SMD identifier failed on x_t {tuple(x_t.shape)}, eta {tuple(eta.shape)}: {err}. "
                "If the channels of x_t were guessed wrong, pass SMD(..., in_channels=...)."
            ) from err

    # ------------------------------------------------------------------ forward
    def forward(self, *args, eta: torch.Tensor | None = None, components: bool = False, **kwargs):
        """``denoiser(*args, **kwargs)`` with the SMD modulation for latent noise ``eta``.

        ``eta``: ``(B, noise_channels, *S)``; drawn fresh from ``N(0, I)`` when ``None``.
        An ``eta`` of batch ``M * B`` evaluates ``M`` latent samples at once (see
        ``forward_samples``; called as ``model(x_t, t, eta=eta, **kwargs)``).

        ``components=True`` (categorical identifier only): evaluate every one of the ``K``
        components, an output of batch ``K * B`` (component-major), and keep their
        log-weights ``(B, K)`` in ``last_log_weights``. Computing both inside ``forward``
        keeps DDP and ``torch.compile`` wrappers in the loop.
        """
        if components:
            return self._forward_components(*args, **kwargs)
        x, t = self._split_inputs(args, kwargs)
        if eta is not None and eta.shape[0] != x.shape[0] and len(args) == 2:
            return self.forward_samples(args[0], args[1], eta, **kwargs)
        z = self.latent(x, t, eta)
        with self._with_latent(z):
            return self.denoiser(*args, **kwargs)

    def _forward_components(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs):
        if not self.categorical:
            raise ValueError("SMD: components=True needs identifier='categorical' (a CategoricalIdentifier)")
        t = self._batch_t(t, x_t)
        self.last_log_weights = self.identifier.log_weights(x_t, t)
        codes = self.identifier.component_latents()
        if self.output_only and self.heads[0].folds_into(self._last_layer()):
            # every example takes the same K codes: the K components fold into the last layer
            with self._with_latent(codes, fold="shared"):
                out = self.denoiser(x_t, t, **kwargs)
            self._check_fanout(out, codes.shape[0] * x_t.shape[0])
            return out
        z = codes.repeat_interleave(x_t.shape[0], dim=0)  # (K * B, D), component-major
        return self.forward_samples(x_t, t, latent=z, **kwargs)

    def _last_layer(self) -> nn.Module:
        return self.denoiser.get_submodule(self.injection_points[-1][0])

    @staticmethod
    def _check_fanout(out: Any, expected: int) -> None:
        got = model_output_tensor(out).shape[0]
        if got != expected:
            raise RuntimeError(
                f"SMD output-only fan-out: expected the denoiser to return batch {expected}, got {got}; "
                "the denoiser does more work after its last layer: use inject='auto' or name points"
            )

    def forward_samples(self, x_t: torch.Tensor, t: torch.Tensor, eta: torch.Tensor | None = None,
                        latent: torch.Tensor | None = None, **kwargs):
        """The denoiser's output for ``M = eta.shape[0] // B`` latent samples at once.

        Returns the denoiser's output with batch ``M * B`` (sample-major: ``m * B + b``).
        With output-only injection the backbone runs once on ``B`` examples and the head and
        last layer on ``M * B`` (the head's ``W_out`` folded into a plain Linear or Conv last
        layer, so the ``M`` samples cost ``D`` channels each, not ``C``); otherwise ``x_t``,
        ``t`` and every tensor keyword argument of batch ``B`` are repeated ``M`` times and the
        denoiser runs on ``M * B``. ``latent``: the ``M * B`` latents ``z`` themselves, in
        place of ``eta`` (the identifier is skipped).
        """
        b = x_t.shape[0]
        given = eta if latent is None else latent
        m = given.shape[0] // b
        if m * b != given.shape[0]:
            raise ValueError(f"{'eta' if latent is None else 'latent'} batch {given.shape[0]} is not a multiple of x_t batch {b}")
        t = self._batch_t(t, x_t)
        if latent is not None:
            z = latent
        elif getattr(self.identifier, "supports_fanout", False):  # x_t / t parts computed once
            z = self.identifier(eta, x_t, t)
        else:
            z = self.identifier(eta, x_t.repeat(m, *([1] * (x_t.dim() - 1))), t.repeat(m))
        if m == 1 or self.output_only:
            with self._with_latent(z, fold="fanout" if m > 1 else None):
                out = self.denoiser(x_t, t, **kwargs)
            self._check_fanout(out, m * b)
            return out
        rep = {
            k: (v.repeat(m, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v)
            for k, v in kwargs.items()
        }
        with self._with_latent(z):
            return self.denoiser(x_t.repeat(m, *([1] * (x_t.dim() - 1))), t.repeat(m), **rep)

    def extra_repr(self) -> str:
        return f"inject={self.injection_points}, latent_dim={self.smd_config['latent_dim']}, hyper_layers={self.smd_config['hyper_layers']}"

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``smd_config.json`` and ``model.safetensors`` under ``save_directory``.

        Each file is written atomically (a temporary file, then ``os.replace``). Extra keyword
        arguments (what diffusers' pipelines pass, e.g. ``safe_serialization``) are ignored.
        """
        from softmix.checkpoint import save_smd

        save_smd(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        denoiser: nn.Module | None = None,
        identifier: nn.Module | None = None,
        map_location: str | torch.device = "cpu",
        **kwargs,
    ) -> "SMD":
        """Load a model written by ``save_pretrained``.

        ``denoiser``: a freshly built denoiser of the same architecture; optional for diffusers
        models (rebuilt from the saved diffusers config). ``identifier``: required when the
        model was built with a custom identifier. Other keyword arguments (from diffusers'
        pipeline loader) are ignored.
        """
        from softmix.checkpoint import load_smd

        return load_smd(path, denoiser=denoiser, identifier=identifier, map_location=map_location)
