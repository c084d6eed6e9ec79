"""A small trainer for the built-in data, used by ``python -m softmix``.

Everything a run needs is in one ``TrainConfig``; all the training state (model, EMA,
optimiser, learning-rate schedule, gradient scaler, step counter, generator and RNG states,
loss history) is in ``Trainer.state_dict()``, so a run can be saved and resumed exactly.

A run directory ``OUT`` (``Trainer.train(out=OUT)``, ``softmix train --out OUT``) holds::

    OUT/checkpoints/step-000100/     one complete checkpoint per save (--save-every, --keep)
        config.json                  the TrainConfig, data shape, step, and the file manifest
        model.safetensors            the trained weights (an SMD model, or the plain backbone)
        ema.safetensors              their exponential moving average (used for sampling)
        trainer_state.pt             optimiser, EMA, schedules, generator/RNG states, losses
    OUT/config.json, OUT/*.safetensors, OUT/trainer_state.pt
                                     the latest checkpoint again (hard links where the file
                                     system has them), for readers of the flat layout

Each checkpoint directory is written whole into a hidden temporary directory and renamed
into place (``softmix.checkpoint.atomic_directory``); a crash mid-save leaves the previous
checkpoints intact and a torn temporary directory that the next run removes.

Under ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins the process group and trains with
DistributedDataParallel; ``batch_size`` stays the global batch: every rank draws the same
global batch (indices, timesteps, noise, ``eta``) from a shared generator and keeps its
slice, so K processes follow the trajectory of one process up to floating-point rounding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from softmix import distributed as dist_utils
from softmix.categorical import DEFAULT_NUM_COMPONENTS
from softmix.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointError,
    atomic_directory,
    atomic_write,
    checkpoint_dir_name,
    list_checkpoints,
    load_json,
    load_state_into,
    load_tensors,
    prune_checkpoints,
    remove_partial_checkpoints,
    replace_with_link,
    save_json,
    save_tensors,
)
from softmix.data import load_data
from softmix.ema import EMA
from softmix.loss import (DEFAULT_CLEAN_WIDTH, DEFAULT_NUM_SAMPLES, SHARPEN_MIN_SIGNAL, _checked_clean_huber,
                          _checked_clean_width, _checked_sharpen, default_bound, training_loss)
from softmix.nets import ConvDenoiser, MLPDenoiser
from softmix.schedule import DEFAULT_FOCUS_RANGE, NoiseSchedule, _checked_focus, _checked_focus_range
from softmix.wrap import SMD

__all__ = [
    "TrainConfig",
    "Trainer",
    "NonFiniteError",
    "build_model",
    "load_trained",
    "find_checkpoint",
    "CONFIG_NAME",
    "PRECISIONS",
]

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
STATE_NAME = "trainer_state.pt"
CHECKPOINT_FILES = (MODEL_NAME, EMA_NAME, STATE_NAME, CONFIG_NAME)  # config.json last
PRECISIONS = ("fp32", "bf16", "fp16")
IDENTIFIERS = ("gaussian", "categorical")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# skip_spikes: the running mean of the gradient norms (decay 0.99) must see this many steps first
SPIKE_WARMUP_STEPS = 100
# skip_spikes: a norm that stays over the factor this many steps in a row is a new scale, not a
# spike: the next such step is taken and the running mean restarts from it, so a run is never
# frozen (at a factor of 3 a collapsing run skipped 249 of its last 278 steps: quality.md)
SPIKE_PATIENCE = 20


class SpikeFilter:
    """``skip_spikes``' rule. After ``warmup`` steps, a step whose gradient norm is over
    ``factor`` (0: off) times ``mean``, the running mean (decay 0.99) of the taken steps' norms,
    is a spike, to be skipped; after ``patience`` spikes in a row the step is taken and the mean
    restarts from its norm. ``skips`` counts the skipped steps."""

    def __init__(self, factor: float, warmup: int | None = None, patience: int | None = None):
        self.factor = factor
        self.warmup = SPIKE_WARMUP_STEPS if warmup is None else warmup
        self.patience = SPIKE_PATIENCE if patience is None else patience
        self.mean: float | None = None
        self.skips = 0
        self.in_a_row = 0  # spikes skipped since the last taken step

    def skip(self, norm: float, step: int) -> bool:
        """Whether to skip ``step`` (1-based), whose gradient norm is ``norm``; counts the skip.
        After a ``False``, call ``took(norm)`` once the step has updated the weights."""
        if not (self.factor and step > self.warmup and self.mean is not None and norm > self.factor * self.mean):
            return False
        if self.in_a_row >= self.patience:
            self.mean = None  # a new scale: took() restarts the mean from this norm
            return False
        self.skips += 1
        self.in_a_row += 1
        return True

    def took(self, norm: float) -> bool:
        """A step with gradient norm ``norm`` updated the weights: it joins the running mean.
        Returns whether it ended a row of ``patience`` spikes (a new scale)."""
        new_scale = self.in_a_row >= self.patience
        self.in_a_row = 0
        self.mean = norm if self.mean is None else 0.99 * self.mean + 0.01 * norm
        return new_scale


@dataclass
class TrainConfig:
    """Everything that defines a training run (written to ``config.json``)."""

    data: str = "gmm"
    iters: int = 2000
    batch_size: int = 256  # the global batch, split over the processes under torchrun
    lr: float = 1e-3
    lr_warmup: int = 0  # linear learning-rate warm-up over this many steps
    num_steps: int = 1000  # T of the training schedule
    schedule: str = "linear"
    # a share of each batch drawn on the steps timestep_focus_range (fractions of T), the rest
    # uniform: NoiseSchedule.sample_timesteps(focus=...)
    timestep_focus: float = 0.0
    timestep_focus_range: tuple[float, float] = DEFAULT_FOCUS_RANGE
    prediction_type: str = "epsilon"
    smd: bool = True
    latent_dim: int = 16
    hyper_layers: int = 2
    inject: str = "output"  # before the last layer only: as good as "auto" on the toy at 1/4.5 the cost
    identifier: str = "gaussian"  # gaussian (SMD's g(eta, x_t, t)) | categorical (softmix.categorical)
    num_components: int = DEFAULT_NUM_COMPONENTS  # K of the categorical identifier
    num_samples: int | None = None  # None: the library default
    bound: str | None = None
    temperature: float = 1.0
    clean_width: float = DEFAULT_CLEAN_WIDTH  # the "clean" bound's component width (data units)
    # the "clean" bound grows linearly beyond this many widths from x0 (softmix.loss.huber_tail;
    # 0: off; None: DEFAULT_CLEAN_HUBER with the "clean" bound)
    clean_huber: float | None = None
    # the "posterior" bound's k_t times this at the last steps, alpha_bar_t >= sharpen_min_signal
    # (softmix.loss.sharpened_precision; 1: off)
    sharpen: float = 1.0
    sharpen_min_signal: float = SHARPEN_MIN_SIGNAL
    ema_decay: float = 0.995
    seed: int = 0
    hidden: int = 128  # backbone width
    layers: int = 3  # backbone depth (MLP blocks / conv residual blocks)
    fourier: int = 64  # vector data: random Fourier features of x_t (0: none); see MLPDenoiser
    fourier_scale: float = 2.0
    identifier_fourier: int = 0  # vector data, categorical identifier: Fourier features for its weights (scale fourier_scale)
    # images, categorical identifier: its weights see a G x G grid of positions (0: their average;
    # None: SMD's default, POSITION_GRID for images)
    identifier_grid: int | None = None
    num_data: int = 20000  # training points drawn from the toy mixtures
    image_size: int = 32  # image folders are resized to this
    channels: int = 3  # image folders: 1 grey, 3 RGB
    grad_clip: float = 1.0
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    compile: bool = False  # torch.compile the model
    grad_checkpoint: bool = False  # recompute the backbone's blocks in the backward pass
    skip_nonfinite: bool = False  # skip steps with a non-finite loss / gradients (else stop)
    # > 1: skip a step whose gradient norm is more than this many times the running mean of the
    # norms before it (0: off; after SPIKE_PATIENCE such steps in a row the next is taken as a new
    # scale: SpikeFilter). A rare batch's gradient spike can undo a categorical SMD model's modes
    # in one step (benchmarks/results/quality.md, "Gradient spikes")
    skip_spikes: float = 0.0
    max_skips: int = 10  # ... but stop after more than this many in a row

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # runs saved before Fourier features, the clean bound's Huber tail, or the identifier's
        # grid of positions existed had none
        d = {"fourier": 0, "clean_huber": 0.0, "identifier_grid": 0, **d}
        if "timestep_focus_range" in d:  # a list in JSON
            d["timestep_focus_range"] = tuple(d["timestep_focus_range"])
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        for name in ("iters", "batch_size", "num_steps", "latent_dim", "hyper_layers", "hidden", "layers", "num_data"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr_warmup < 0:
            raise ValueError(f"lr_warmup must be >= 0, got {self.lr_warmup}")
        if self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {self.max_skips}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.identifier not in IDENTIFIERS:
            raise ValueError(f"identifier must be one of {IDENTIFIERS}, got {self.identifier!r}")
        if self.num_components < 1:
            raise ValueError(f"num_components must be a positive integer, got {self.num_components}")
        if self.identifier_fourier < 0:
            raise ValueError(f"identifier_fourier must be >= 0, got {self.identifier_fourier}")
        if self.identifier_fourier and self.identifier != "categorical":
            raise ValueError(f"identifier_fourier={self.identifier_fourier} needs identifier='categorical'")
        if self.identifier_grid is not None and self.identifier_grid < 0:
            raise ValueError(f"identifier_grid must be >= 0, got {self.identifier_grid}")
        if self.identifier_grid and self.identifier != "categorical":  # a plain model (compare's) ignores it
            raise ValueError(f"identifier_grid={self.identifier_grid} needs identifier='categorical'")
        _checked_clean_width(self.clean_width)
        categorical = self.smd and self.identifier == "categorical"
        _checked_clean_huber(self.clean_huber, self.bound or default_bound(categorical))
        _checked_sharpen(self.sharpen, self.sharpen_min_signal, self.bound or default_bound(categorical))
        if not (self.skip_spikes == 0 or (self.skip_spikes > 1 and math.isfinite(self.skip_spikes))):
            raise ValueError(f"skip_spikes must be 0 (off) or a finite factor > 1, got {self.skip_spikes}")
        try:
            _checked_focus(self.timestep_focus)
            _checked_focus_range(self.timestep_focus_range)
        except ValueError as err:
            raise ValueError(f"timestep_{err}") from None


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient.

    ``step``: the step (1-based) whose update was refused; ``last_checkpoint``: the last
    checkpoint written or resumed from (untouched by the failed step), or ``None``.
    """

    def __init__(self, message: str, step: int, last_checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


def build_model(cfg: TrainConfig, sample_shape: tuple[int, ...]) -> nn.Module:
    """The backbone for data of ``sample_shape`` (one example), wrapped in SMD when ``cfg.smd``."""
    if len(sample_shape) == 1:
        backbone = MLPDenoiser(sample_shape[0], hidden=cfg.hidden, layers=cfg.layers,
                               fourier=cfg.fourier, fourier_scale=cfg.fourier_scale)
    elif len(sample_shape) == 3:
        groups = math.gcd(8, cfg.hidden)
        backbone = ConvDenoiser(sample_shape[0], hidden=cfg.hidden, blocks=cfg.layers, groups=groups)
    else:
        raise ValueError(f"no built-in backbone for examples of shape {sample_shape}")
    backbone.gradient_checkpointing = bool(cfg.grad_checkpoint)
    if not cfg.smd:
        return backbone
    model = SMD(backbone, latent_dim=cfg.latent_dim, hyper_layers=cfg.hyper_layers, inject=cfg.inject,
                identifier="categorical" if cfg.identifier == "categorical" else None,
                num_components=cfg.num_components,
                identifier_fourier=cfg.identifier_fourier,
                identifier_fourier_scale=cfg.fourier_scale,
                identifier_grid=cfg.identifier_grid)
    if cfg.grad_checkpoint:
        # The recomputation runs in the backward pass, after SMD.forward has cleared the
        # latent its hooks read: a hook inside a recomputed block would modulate in the
        # forward but not in the recomputation, and the gradients would be silently wrong.
        inside = [name for name, _ in model.injection_points if name.startswith("blocks.")]
        if inside:
            raise ValueError(
                f"grad_checkpoint recomputes the backbone's blocks, but SMD injects inside them ({inside}); "
                "inject outside the blocks (auto, input, output) or turn off grad_checkpoint"
            )
    return model


def _autocast_dtype_check(device: torch.device, precision: str) -> None:
    """Refuse a precision that autocast would silently ignore on this device."""
    if precision == "fp32":
        return
    dtype = _AUTOCAST_DTYPES[precision]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("precision 'bf16' is not supported by this GPU; use fp16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device_type=device.type, dtype=dtype):
            pass
    if caught:  # autocast warns and disables itself for a dtype it cannot do
        raise ValueError(f"precision {precision!r} is not supported by {device.type} autocast here: {caught[0].message}")


class Trainer:
    """Train an SMD (or plain) model on built-in data, in one process or under ``torchrun``.

    ``Trainer(cfg).train(out=OUT, save_every=100, keep=3)`` runs ``cfg.iters`` steps (with a
    tqdm bar on rank 0), checkpointing under ``OUT``; ``Trainer.resume(OUT)`` continues the
    run from its latest complete checkpoint.

    Args:
        cfg: the run's configuration.
        data: ``(N, *shape)`` training data instead of ``cfg.data``.
        distributed: join the ``torchrun`` process group; ``None``: when ``WORLD_SIZE > 1``.
    """

    def __init__(self, cfg: TrainConfig, data: torch.Tensor | None = None, distributed: bool | None = None):
        cfg.validate()
        self.cfg = cfg
        if distributed is False:
            self.dist, self.device = dist_utils.DistInfo(), torch.device(cfg.device)
        else:
            owned = not dist_utils.is_initialized()
            self.dist, self.device = dist_utils.setup(cfg.device)
            self._owns_group = owned and self.dist.distributed
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                f"{self.dist.world_size} processes; choose a multiple of {self.dist.world_size}"
            )
        self.local_batch = cfg.batch_size // self.dist.world_size
        _autocast_dtype_check(self.device, cfg.precision)

        torch.manual_seed(cfg.seed)  # model initialisation: the same on every rank
        data_gen = torch.Generator().manual_seed(cfg.seed)
        if data is None:
            data, self.mixture = load_data(cfg.data, n=cfg.num_data, generator=data_gen,
                                           image_size=cfg.image_size, channels=cfg.channels)
        else:
            self.mixture = None
        self.data = data.to(self.device)
        self.schedule = NoiseSchedule(cfg.num_steps, cfg.schedule)
        # self.model: the bare module (weights, EMA, checkpoints); self.forward_model: what
        # the loss calls (DDP and / or torch.compile around it, sharing its parameters)
        self.model = build_model(cfg, tuple(self.data.shape[1:])).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        warmup = cfg.lr_warmup
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.ema = EMA(self.model, decay=cfg.ema_decay)
        self.forward_model = self._wrap(self.model)
        # The data / noise generator is shared: every rank draws the global batch and keeps
        # its slice. The global RNG (dropout, user code) differs per rank.
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        if self.dist.rank:
            torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        self.step = 0
        self.losses: list[float] = []
        self.skipped_steps = 0  # non-finite steps skipped (skip_nonfinite)
        self.consecutive_skips = 0
        self.scaler_skips = 0  # fp16 steps the gradient scaler skipped (overflow)
        self.spikes = SpikeFilter(cfg.skip_spikes)  # skip_spikes' running mean and count
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # every parameter (backbone, identifier, heads) takes part in every forward, so
            # find_unused_parameters stays off
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def close(self) -> None:
        """Leave the process group, if this trainer created it."""
        if getattr(self, "_owns_group", False):
            dist_utils.cleanup()
            self._owns_group = False

    # ------------------------------------------------------------------ training
    @property
    def num_samples(self) -> int:
        return DEFAULT_NUM_SAMPLES if self.cfg.num_samples is None else int(self.cfg.num_samples)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's share of the next global batch: ``x0``, ``t``, ``noise`` (and ``eta``).

        The global draws come in the order and shapes that ``training_loss`` itself would
        use for a batch of ``batch_size``, so one process reproduces an un-sliced run
        (``t`` with ``cfg.timestep_focus``, which ``training_loss`` does not draw itself).
        """
        g, cfg = self.generator, self.cfg
        n = cfg.batch_size
        idx = torch.randint(0, self.data.shape[0], (n,), generator=g, device=g.device)
        x0 = self.data[idx.to(self.data.device)]
        t = self.schedule.sample_timesteps(n, device=self.device, generator=g, focus=cfg.timestep_focus,
                                           focus_range=cfg.timestep_focus_range)
        noise = torch.randn(x0.shape, generator=g, device=g.device, dtype=x0.dtype).to(self.device)
        eta = None
        if isinstance(self.model, SMD) and not self.model.categorical:  # categorical: enumerated, no eta
            eta = self.model.sample_eta(x0, g, num_samples=self.num_samples)
        if self.dist.distributed:
            lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
            x0, t, noise = x0[lo:hi], t[lo:hi], noise[lo:hi]
            if eta is not None:  # sample-major (M * B, ...): slice every sample's block
                rest = eta.shape[1:]
                eta = eta.reshape(self.num_samples, n, *rest)[:, lo:hi].reshape(-1, *rest)
        batch = {"x0": x0, "t": t, "noise": noise}
        if eta is not None:
            batch["eta"] = eta
        return batch

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST_DTYPES[self.cfg.precision])

    def train_step(self, batch: dict[str, torch.Tensor] | None = None) -> float:
        """One optimiser step on ``batch`` (default ``next_batch()``); returns the loss (the
        mean over all ranks). A non-finite loss or gradient raises ``NonFiniteError`` or,
        with ``skip_nonfinite``, leaves the weights, optimiser and EMA untouched; with
        ``skip_spikes``, so does a step whose gradient norm is a spike (``_is_spike``)."""
        cfg = self.cfg
        batch = self.next_batch() if batch is None else batch
        self.forward_model.train()
        with self._autocast():
            loss = training_loss(
                self.forward_model, self.schedule, batch["x0"],
                num_samples=cfg.num_samples, bound=cfg.bound, temperature=cfg.temperature,
                clean_width=cfg.clean_width, clean_huber=cfg.clean_huber, prediction_type=cfg.prediction_type,
                sharpen=cfg.sharpen, sharpen_min_signal=cfg.sharpen_min_signal,
                t=batch["t"], noise=batch["noise"], eta=batch.get("eta"),
            )
        self.optimizer.zero_grad(set_to_none=True)
        # every rank runs the backward pass, finite or not: DDP's gradient all-reduce is a
        # collective, and a rank that stopped early would leave the others waiting
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        # the gradients are already averaged over ranks, so every rank sees the same norm and
        # the same mean loss, and takes the same decision below
        value = loss.detach().float()
        value = float(dist_utils.all_reduce_mean(value) if self.dist.distributed else value)
        step = self.step + 1
        finite_loss = math.isfinite(value)
        norm = float(grad_norm)
        finite_grads = math.isfinite(norm)
        if not finite_loss or (not finite_grads and not self.scaler.is_enabled()):
            # (with fp16, overflowing gradients are the scaler's business: it skips the step
            # and lowers the scale; a non-finite loss is not an overflow it can fix)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            self._nonfinite(step, "loss" if not finite_loss else "gradients", value)
            return value
        self.consecutive_skips = 0
        if finite_grads and self._is_spike(step, norm, value):
            return value
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:  # the scaler skipped the step
            self.scaler_skips += 1
        else:
            self.lr_scheduler.step()
            self.ema.update(self.model)
            if self.spikes.took(norm) and self.dist.is_main:
                print(f"softmix: step {step}: the gradient norm has been over {self.cfg.skip_spikes:g}x the running "
                      f"mean {self.spikes.patience} steps in a row; step taken as a new scale, the mean restarts "
                      f"from it ({norm:.4g})", file=sys.stderr)
        self.step = step
        self.losses.append(value)
        return value

    def _is_spike(self, step: int, norm: float, value: float) -> bool:
        """With ``skip_spikes``, refuse a step whose gradient norm is a spike: no update of the
        weights, optimiser, EMA or running mean; its data are consumed and its loss recorded."""
        if not self.spikes.skip(norm, step):
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()  # unscale_ ran; the scaler must close the step
        self.step = step
        self.losses.append(value)
        if self.dist.is_main:
            print(f"softmix: step {step}: gradient norm {norm:.4g} is {norm / self.spikes.mean:.1f}x the running "
                  f"mean; step skipped as a spike ({self.spikes.skips} so far)", file=sys.stderr)
        return True

    def _nonfinite(self, step: int, what: str, value: float) -> None:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
                 else "no checkpoint has been written yet (save with save_every / --save-every)")
        if not self.cfg.skip_nonfinite:
            raise NonFiniteError(
                f"non-finite {what} at step {step} (loss {value}); stopped without updating the model. "
                f"{where}; continue from it with --resume, or skip such steps with --skip-nonfinite",
                step, self.last_checkpoint)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.step = step  # the step's data and noise are consumed; the weights are not updated
        self.losses.append(value)
        if self.dist.is_main:
            print(f"softmix: step {step}: non-finite {what}, step skipped ({self.skipped_steps} skipped so far)",
                  file=sys.stderr)
        if self.consecutive_skips > self.cfg.max_skips:
            raise NonFiniteError(
                f"{self.consecutive_skips} non-finite steps in a row (steps {step - self.consecutive_skips + 1} to "
                f"{step}; max_skips is {self.cfg.max_skips}); stopped. {where}",
                step, self.last_checkpoint)

    def train(
        self,
        iters: int | None = None,
        progress: bool = True,
        callback: Callable[["Trainer"], None] | None = None,
        out: str | os.PathLike | None = None,
        save_every: int | None = None,
        keep: int | None = None,
    ) -> list[float]:
        """Run until ``iters`` total steps (default ``cfg.iters``); returns the loss history.

        With ``out``: checkpoint every ``save_every`` steps and at the end (see the module
        docstring), keeping the newest ``keep`` checkpoints (all when ``None``). ``callback``
        runs after each step (and its checkpoint).
        """
        from tqdm.auto import tqdm

        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        total = self.cfg.iters if iters is None else iters
        if out is not None and self.dist.is_main:
            remove_partial_checkpoints(out)
        name = "SMD" if self.cfg.smd else "plain"
        bar = tqdm(total=max(total - self.step, 0), desc=f"training {name} on {self.cfg.data}",
                   disable=not progress or not self.dist.is_main)
        with bar:
            while self.step < total:
                loss = self.train_step()
                bar.update(1)
                if self.step % 50 == 0 or self.step == total:
                    bar.set_postfix(loss=f"{loss:.4f}")
                if out is not None and save_every and self.step % save_every == 0:
                    self.save_checkpoint(out, keep=keep)
                if callback is not None:
                    callback(self)
        if out is not None and self._saved_step != self.step:
            self.save_checkpoint(out, keep=keep)
        return self.losses

    def ema_model(self) -> nn.Module:
        """A copy of the model carrying the EMA weights (for sampling)."""
        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        return model.eval()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The whole training state. Collective under torchrun (gathers every rank's RNG)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "generator": self.generator.get_state(),
            "torch_rng": rng["cpu"],
            "rank_rng": dist_utils.all_gather_object(rng) if self.dist.distributed else [rng],
            "losses": list(self.losses),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "scaler_skips": self.scaler_skips,
            "spike_skips": self.spikes.skips,
            "grad_norm_mean": self.spikes.mean,
            "spikes_in_a_row": self.spikes.in_a_row,
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. saved by a softmix whose model had other layers
            raise CheckpointError(f"the training state does not fit this model's parameters ({err}): the run "
                                  "cannot resume training; its weights may still load for sampling (load_trained)") from err
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"].cpu())
        ranks = state.get("rank_rng")
        if ranks is not None and len(ranks) == self.dist.world_size:
            torch.set_rng_state(ranks[self.dist.rank]["cpu"].cpu())
            if "cuda" in ranks[self.dist.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(ranks[self.dist.rank]["cuda"].cpu(), self.device)
        else:  # an old checkpoint, or another number of processes: the data stream is exact,
            # the per-rank global RNG (unused by the built-in models) restarts from rank 0's
            torch.set_rng_state(state["torch_rng"].cpu())
        self.losses = list(state["losses"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.scaler_skips = int(state.get("scaler_skips", 0))
        self.spikes.skips = int(state.get("spike_skips", 0))
        self.spikes.mean = state.get("grad_norm_mean")
        self.spikes.in_a_row = int(state.get("spikes_in_a_row", 0))

    def _meta(self, files: dict[str, int] | None = None) -> dict:
        meta = {
            "format": "softmix-train", "version": 1, "config": asdict(self.cfg),
            "sample_shape": list(self.data.shape[1:]), "step": self.step,
            "schedule": self.schedule.to_dict(), "world_size": self.dist.world_size,
        }
        if files is not None:
            meta["files"] = files
        return meta

    def _write_files(self, directory: Path, state: dict) -> None:
        """The checkpoint's files into ``directory``; ``config.json`` (with the manifest) last."""
        metadata = {"step": str(self.step)}
        save_tensors(directory / MODEL_NAME, state["model"], metadata=metadata)
        save_tensors(directory / EMA_NAME, self.ema.shadow, metadata=metadata)
        rest = {k: v for k, v in state.items() if k != "model"}
        rest["ema"] = {k: v for k, v in rest["ema"].items() if k != "shadow"}  # in ema.safetensors
        atomic_write(directory / STATE_NAME, lambda tmp: torch.save(rest, tmp))
        files = {name: (directory / name).stat().st_size for name in CHECKPOINT_FILES[:-1]}
        save_json(directory / CONFIG_NAME, self._meta(files))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write one checkpoint (the four files above) directly under ``directory``.

        Each file is atomic; for a series of checkpoints that are atomic as a whole, use
        ``save_checkpoint``. Collective under torchrun: rank 0 writes.
        """
        directory = Path(directory)
        state = self.state_dict()

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True)
            self._write_files(directory, state)

        self._on_main(write)
        return directory

    def save_checkpoint(self, out: str | os.PathLike, keep: int | None = None) -> Path:
        """Write ``out/checkpoints/step-N/`` atomically, point the flat files of ``out`` at
        it, and delete all but the newest ``keep`` checkpoints. Returns the checkpoint path.

        Collective under torchrun: every rank calls it, rank 0 writes, and no rank returns
        before the checkpoint is complete.
        """
        out = Path(out)
        final = out / CHECKPOINTS_DIR / checkpoint_dir_name(self.step)
        state = self.state_dict()

        def write() -> None:
            with atomic_directory(final) as tmp:
                self._write_files(tmp, state)
            for name in CHECKPOINT_FILES:  # config.json last: readers key on it
                replace_with_link(final / name, out / name)
            if keep is not None:
                prune_checkpoints(out, keep, is_complete=_is_complete)

        self._on_main(write)
        self.last_checkpoint = final
        self._saved_step = self.step
        return final

    def _on_main(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on rank 0; the other ranks wait for it and fail if it failed."""
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 (re-raised below, after telling the others)
                error = err
        # the broadcast doubles as the barrier after a save
        ok = dist_utils.broadcast_object(error is None) if self.dist.distributed else error is None
        if error is not None:
            raise error
        if not ok:
            raise CheckpointError("rank 0 failed to write the checkpoint")

    @classmethod
    def resume(cls, out: str | os.PathLike, data: torch.Tensor | None = None, **overrides) -> "Trainer":
        """A trainer in the state of the latest complete checkpoint of the run in ``out``.

        ``out``: a run directory (its newest complete ``checkpoints/step-N`` is used; torn
        temporary directories are ignored) or a checkpoint directory itself.
        ``overrides``: ``TrainConfig`` fields to change (``iters``; and options that do not
        change the arithmetic: ``compile``, ``grad_checkpoint``, ``skip_nonfinite``, ...).
        """
        path = find_checkpoint(out, require_state=True)
        meta = _read_meta(path)
        cfg = TrainConfig.from_dict(meta["config"])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        cfg = dataclasses.replace(cfg, **overrides)
        trainer = cls(cfg, data=data)
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
        state["model"] = load_tensors(path / MODEL_NAME, map_location=trainer.device)
        if "shadow" not in state["ema"]:
            state["ema"]["shadow"] = load_tensors(path / EMA_NAME, map_location=trainer.device)
        trainer.load_state_dict(state)
        trainer.last_checkpoint = path
        trainer._saved_step = trainer.step
        return trainer


def _is_complete(path: Path) -> bool:
    """Whether ``path`` holds a whole checkpoint: ``config.json`` readable and every file in
    its manifest present with the recorded size."""
    try:
        meta = load_json(path / CONFIG_NAME)
    except CheckpointError:
        return False
    files = meta.get("files")
    if meta.get("format") != "softmix-train" or not isinstance(files, dict):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def find_checkpoint(directory: str | os.PathLike, require_state: bool = False) -> Path:
    """The checkpoint to read for ``directory``: its newest complete ``checkpoints/step-N``
    when it is a run directory, else ``directory`` itself (a checkpoint, or an older flat run).
    ``require_state``: the checkpoint must carry the trainer state (for resuming)."""
    directory = Path(directory)
    found = list_checkpoints(directory, is_complete=_is_complete)
    if found:
        return found[-1][1]
    if (directory / CHECKPOINTS_DIR).is_dir():
        # a run directory: its flat files mirror one of these checkpoints, so no fallback
        raise CheckpointError(f"no complete checkpoint under {directory / CHECKPOINTS_DIR}")
    _read_meta(directory)
    if require_state and not (directory / STATE_NAME).is_file():
        raise CheckpointError(f"checkpoint file {directory / STATE_NAME} is missing")
    return directory


def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}: not a directory")
    meta = load_json(directory / CONFIG_NAME)
    if meta.get("format") != "softmix-train":
        raise CheckpointError(f"{directory / CONFIG_NAME} is not a softmix training checkpoint")
    return meta


def load_trained(directory: str | os.PathLike, ema: bool = True, device: str = "cpu"):
    """``(model, schedule, cfg, sample_shape)`` from a run or checkpoint directory written by
    ``Trainer`` (a run directory resolves to its newest complete checkpoint).

    ``ema``: load the EMA weights (what sampling should use) rather than the raw weights.
    """
    directory = find_checkpoint(directory)
    meta = _read_meta(directory)
    cfg = TrainConfig.from_dict(meta["config"])
    cfg.grad_checkpoint = False  # a training-time option; irrelevant for inference
    shape = tuple(meta["sample_shape"])
    model = build_model(cfg, shape)
    path = directory / (EMA_NAME if ema else MODEL_NAME)
    load_state_into(model, load_tensors(path, map_location=device), str(path))
    schedule = NoiseSchedule.from_dict(meta["schedule"])
    return model.to(device).eval(), schedule, cfg, shape
