"""An exponential moving average of a model's weights, for sampling.

``shadow = decay * shadow + (1 - decay) * weights`` after every optimiser step, with the
usual warm-up ``decay_t = min(decay, (1 + n) / (10 + n))`` so early averages are not dominated
by the random initialisation. Buffers (e.g. batch-norm statistics) are copied, not averaged.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """EMA of ``model``'s floating-point parameters.

    Args:
        model: the model being trained (its parameter names key the average).
        decay: the target decay.
        warmup: use the ``(1 + n) / (10 + n)`` warm-up of the decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        d = self.current_decay()
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.lerp_(v.detach().to(s.dtype), 1.0 - d)
            else:
                s.copy_(v)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.shadow, strict=True)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module):
        """Temporarily swap the averaged weights into ``model`` (restored on exit)."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(saved, strict=True)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
