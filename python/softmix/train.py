"""A small trainer for the built-in data, used by ``python -m softmix``.

Everything a run needs is in one ``TrainConfig``; all the training state (model, EMA,
optimiser, step counter, generator state, loss history) is in ``Trainer.state_dict()``, so a
run can be saved and resumed. A checkpoint directory holds::

    config.json          the TrainConfig and the data shape
    model.safetensors    the trained weights (an SMD model, or the plain backbone)
    ema.safetensors      their exponential moving average (used for sampling)
    trainer_state.pt     optimiser, step, generator state, losses (for --resume)

Each file is written atomically; ``config.json`` last.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from softmix.checkpoint import (
    CheckpointError,
    atomic_write,
    load_json,
    load_state_into,
    load_tensors,
    save_json,
    save_tensors,
)
from softmix.data import load_data
from softmix.ema import EMA
from softmix.loss import training_loss
from softmix.nets import ConvDenoiser, MLPDenoiser
from softmix.schedule import NoiseSchedule
from softmix.wrap import SMD

__all__ = ["TrainConfig", "Trainer", "build_model", "load_trained", "CONFIG_NAME"]

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
STATE_NAME = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Everything that defines a training run (written to ``config.json``)."""

    data: str = "gmm"
    iters: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    num_steps: int = 1000  # T of the training schedule
    schedule: str = "linear"
    prediction_type: str = "epsilon"
    smd: bool = True
    latent_dim: int = 16
    hyper_layers: int = 2
    inject: str = "auto"
    num_samples: int | None = None  # None: the library default
    bound: str | None = None
    temperature: float = 1.0
    ema_decay: float = 0.995
    seed: int = 0
    hidden: int = 128  # backbone width
    layers: int = 3  # backbone depth (MLP blocks / conv residual blocks)
    num_data: int = 20000  # training points drawn from the toy mixtures
    image_size: int = 32  # image folders are resized to this
    channels: int = 3  # image folders: 1 grey, 3 RGB
    grad_clip: float = 1.0
    device: str = "cpu"

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def build_model(cfg: TrainConfig, sample_shape: tuple[int, ...]) -> nn.Module:
    """The backbone for data of ``sample_shape`` (one example), wrapped in SMD when ``cfg.smd``."""
    if len(sample_shape) == 1:
        backbone = MLPDenoiser(sample_shape[0], hidden=cfg.hidden, layers=cfg.layers)
    elif len(sample_shape) == 3:
        groups = math.gcd(8, cfg.hidden)
        backbone = ConvDenoiser(sample_shape[0], hidden=cfg.hidden, blocks=cfg.layers, groups=groups)
    else:
        raise ValueError(f"no built-in backbone for examples of shape {sample_shape}")
    if not cfg.smd:
        return backbone
    return SMD(backbone, latent_dim=cfg.latent_dim, hyper_layers=cfg.hyper_layers, inject=cfg.inject)


class Trainer:
    """Train an SMD (or plain) model on built-in data.

    ``Trainer(cfg).train()`` runs ``cfg.iters`` steps (with a tqdm bar) and returns the losses.
    """

    def __init__(self, cfg: TrainConfig, data: torch.Tensor | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)  # model initialisation
        data_gen = torch.Generator().manual_seed(cfg.seed)
        if data is None:
            data, self.mixture = load_data(cfg.data, n=cfg.num_data, generator=data_gen,
                                           image_size=cfg.image_size, channels=cfg.channels)
        else:
            self.mixture = None
        self.data = data.to(self.device)
        self.schedule = NoiseSchedule(cfg.num_steps, cfg.schedule)
        self.model = build_model(cfg, tuple(self.data.shape[1:])).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.ema = EMA(self.model, decay=cfg.ema_decay)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.losses: list[float] = []

    # ------------------------------------------------------------------ training
    def next_batch(self) -> torch.Tensor:
        idx = torch.randint(0, self.data.shape[0], (self.cfg.batch_size,), generator=self.generator,
                            device=self.generator.device)
        return self.data[idx.to(self.data.device)]

    def train_step(self, x0: torch.Tensor) -> float:
        cfg = self.cfg
        self.model.train()
        loss = training_loss(
            self.model, self.schedule, x0,
            num_samples=cfg.num_samples, bound=cfg.bound, temperature=cfg.temperature,
            prediction_type=cfg.prediction_type, generator=self.generator,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def train(self, iters: int | None = None, progress: bool = True,
              callback: Callable[["Trainer"], None] | None = None) -> list[float]:
        """Run until ``iters`` total steps (default ``cfg.iters``); returns the loss history."""
        from tqdm.auto import tqdm

        total = self.cfg.iters if iters is None else iters
        name = "SMD" if self.cfg.smd else "plain"
        bar = tqdm(range(self.step, total), desc=f"training {name} on {self.cfg.data}", disable=not progress)
        for _ in bar:
            loss = self.train_step(self.next_batch())
            if self.step % 50 == 0 or self.step == total:
                bar.set_postfix(loss=f"{loss:.4f}")
            if callback is not None:
                callback(self)
        return self.losses

    def ema_model(self) -> nn.Module:
        """A copy of the model carrying the EMA weights (for sampling)."""
        import copy

        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        return model.eval()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.losses = list(state["losses"])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the checkpoint (see the module docstring) under ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors(directory / MODEL_NAME, self.model.state_dict())
        save_tensors(directory / EMA_NAME, self.ema.shadow)
        state = {k: v for k, v in self.state_dict().items() if k != "model"}
        atomic_write(directory / STATE_NAME, lambda tmp: torch.save(state, tmp))
        save_json(directory / CONFIG_NAME, {
            "format": "softmix-train", "version": 1, "config": asdict(self.cfg),
            "sample_shape": list(self.data.shape[1:]), "step": self.step,
            "schedule": self.schedule.to_dict(),
        })
        return directory

    @classmethod
    def resume(cls, directory: str | os.PathLike) -> "Trainer":
        """A trainer in the state saved under ``directory``."""
        directory = Path(directory)
        meta = _read_meta(directory)
        trainer = cls(TrainConfig.from_dict(meta["config"]))
        state = torch.load(directory / STATE_NAME, map_location=trainer.device, weights_only=False)
        state["model"] = load_tensors(directory / MODEL_NAME, map_location=trainer.device)
        trainer.load_state_dict(state)
        return trainer


def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}: not a directory")
    meta = load_json(directory / CONFIG_NAME)
    if meta.get("format") != "softmix-train":
        raise CheckpointError(f"{directory / CONFIG_NAME} is not a softmix training checkpoint")
    return meta


def load_trained(directory: str | os.PathLike, ema: bool = True, device: str = "cpu"):
    """``(model, schedule, cfg, sample_shape)`` from a checkpoint written by ``Trainer.save``.

    ``ema``: load the EMA weights (what sampling should use) rather than the raw weights.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    cfg = TrainConfig.from_dict(meta["config"])
    shape = tuple(meta["sample_shape"])
    model = build_model(cfg, shape)
    path = directory / (EMA_NAME if ema else MODEL_NAME)
    load_state_into(model, load_tensors(path, map_location=device), str(path))
    schedule = NoiseSchedule.from_dict(meta["schedule"])
    return model.to(device).eval(), schedule, cfg, shape
