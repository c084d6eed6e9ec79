"""The forward (noising) process: betas, cumulative alphas, ``add_noise``, respacing.

One concept, as diffusers' schedulers have it: the schedule says how much noise is at each
training step ``t = 0 .. num_steps - 1``; the sampler (``softmix.sampling``) steps backwards
through a respaced subset of those steps with ``softmix.ops.denoise_step``.

Notation (Ho et al. 2020): ``beta_t``, ``alpha_t = 1 - beta_t``,
``alpha_bar_t = prod_{s <= t} alpha_s``, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NoiseSchedule", "SCHEDULE_KINDS", "PREDICTION_TYPES"]

SCHEDULE_KINDS = ("linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# The curve that linear and sigmoid schedules follow when no explicit betas are given:
# the DDPM paper's 1000-step schedule, beta from 1e-4 to 0.02.
REFERENCE_STEPS = 1000
DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 0.02
# sample_timesteps(focus=...): the steps t = 20 .. 99 of a 1000-step chain
DEFAULT_FOCUS_RANGE = (0.02, 0.1)


def _checked_focus(focus) -> float:
    try:
        focus = float(focus)
    except (TypeError, ValueError):
        raise ValueError(f"focus must lie in [0, 1] (the share of the batch on the focus steps), got {focus!r}") from None
    if not 0.0 <= focus <= 1.0:  # also refuses nan
        raise ValueError(f"focus must lie in [0, 1] (the share of the batch on the focus steps), got {focus}")
    return focus


def _checked_focus_range(focus_range) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in focus_range)
    except (TypeError, ValueError):
        raise ValueError(f"focus_range must be two numbers (lo, hi), fractions of num_steps; got {focus_range!r}") from None
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"focus_range must satisfy 0 <= lo < hi <= 1 (fractions of num_steps), got ({a}, {b})")
    return a, b


def _linear_betas(num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # diffusers' "linear": torch.linspace in float32
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32).double()


def _sigmoid_betas(num_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # diffusers' "sigmoid" (GeoDiff): sigmoid(linspace(-6, 6)) scaled to [beta_start, beta_end]
    betas = torch.linspace(-6, 6, num_steps, dtype=torch.float32)
    return (torch.sigmoid(betas) * (beta_end - beta_start) + beta_start).double()


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, diffusers' "squaredcos_cap_v2":
    # alpha_bar(u) = cos^2((u + 0.008) / 1.008 * pi / 2), beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T)
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float32).double()


class NoiseSchedule:
    """A discrete variance-preserving noise schedule with ``num_steps`` steps.

    Args:
        num_steps: number of training steps ``T`` (any ``T >= 1``; small ``T`` such as 2 or 4
            is trained and sampled directly).
        kind: ``"linear"`` (DDPM), ``"cosine"`` (improved DDPM, diffusers'
            ``squaredcos_cap_v2``) or ``"sigmoid"`` (GeoDiff).
        beta_start, beta_end: endpoints of the linear / sigmoid betas. When both are left
            ``None``, the schedule follows the DDPM paper's 1000-step curve (``1e-4 .. 0.02``):
            with ``num_steps == 1000`` the betas are exactly diffusers' ``DDPMScheduler``
            betas; with another ``T`` the cumulative alphas are that curve taken at ``T``
            evenly spaced steps, so the last step is pure noise for any ``T`` (a 4-step
            linear schedule with betas ``1e-4 .. 0.02`` would leave ``alpha_bar_T = 0.97``).
            When given, the betas are diffusers' formula at ``num_steps`` as is.

    Attributes (all float32 tensors of shape ``(num_steps,)`` on the CPU; computed in float64):
        betas, alphas, alphas_cumprod.
    """

    def __init__(
        self,
        num_steps: int = 1000,
        kind: str = "linear",
        beta_start: float | None = None,
        beta_end: float | None = None,
    ):
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        self.num_steps = num_steps
        self.kind = kind
        explicit = beta_start is not None or beta_end is not None
        self.beta_start = DEFAULT_BETA_START if beta_start is None else float(beta_start)
        self.beta_end = DEFAULT_BETA_END if beta_end is None else float(beta_end)
        if kind != "cosine" and not (0 < self.beta_start <= self.beta_end < 1):
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        self._explicit_betas = explicit

        if kind == "cosine":
            betas = _cosine_betas(num_steps)
        else:
            make = _linear_betas if kind == "linear" else _sigmoid_betas
            if explicit or num_steps == REFERENCE_STEPS:
                betas = make(num_steps, self.beta_start, self.beta_end)
            else:
                # follow the reference curve: alpha_bar at T evenly spaced reference steps
                ref = torch.cumprod(1 - make(REFERENCE_STEPS, self.beta_start, self.beta_end), 0)
                idx = torch.tensor(
                    [round((i + 1) * REFERENCE_STEPS / num_steps) - 1 for i in range(num_steps)]
                )
                acp = ref[idx]
                prev = torch.cat([acp.new_ones(1), acp[:-1]])
                betas = 1 - acp / prev
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        self.betas = betas.float()
        self.alphas = alphas.float()
        self.alphas_cumprod = alphas_cumprod.float()

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_steps={self.num_steps}, kind={self.kind!r})"

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """JSON-serialisable arguments that rebuild this schedule with ``from_dict``."""
        d = {"num_steps": self.num_steps, "kind": self.kind}
        if self._explicit_betas:
            d.update(beta_start=self.beta_start, beta_end=self.beta_end)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        return cls(**d)

    # ------------------------------------------------------------------ forward process
    def _at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``alpha_bar_t`` gathered per example, shaped ``(B, 1, ..., 1)`` to broadcast on ``like``."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        if t.dim() == 0:
            t = t.expand(like.shape[0])
        if t.min() < 0 or t.max() >= self.num_steps:
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}], got {t.min()}..{t.max()}")
        a = self.alphas_cumprod[t.cpu()].to(device=like.device, dtype=like.dtype)
        return a.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``; ``t`` is ``(B,)`` integer."""
        a = self._at(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str = "epsilon"
    ) -> torch.Tensor:
        """What a denoiser of ``prediction_type`` should output at ``x_t = add_noise(x0, noise, t)``.

        ``epsilon`` -> ``noise``; ``v_prediction`` -> ``v = sqrt(a) noise - sqrt(1 - a) x0``
        (Salimans & Ho 2022); ``sample`` -> ``x0``.
        """
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            a = self._at(t, x0)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def focus_steps(self, focus_range: tuple[float, float] = DEFAULT_FOCUS_RANGE) -> tuple[int, int]:
        """The steps ``[lo, hi)`` that ``focus_range`` (fractions of ``num_steps``) names.

        ``lo = floor(a T)``, ``hi = max(floor(b T), lo + 1)``: never empty, so a short chain
        focuses on its least noisy step(s). ``(0.02, 0.1)`` at ``T = 1000`` is ``t = 20 .. 99``.
        """
        a, b = _checked_focus_range(focus_range)
        lo = min(int(math.floor(a * self.num_steps)), self.num_steps - 1)
        return lo, max(int(math.floor(b * self.num_steps)), lo + 1)

    def timestep_probabilities(
        self, focus: float = 0.0, focus_range: tuple[float, float] = DEFAULT_FOCUS_RANGE
    ) -> torch.Tensor:
        """``(num_steps,)`` float64: the distribution that ``sample_timesteps`` draws from,
        ``(1 - focus) / T + focus / (hi - lo) * [lo <= t < hi]``."""
        focus = _checked_focus(focus)
        p = torch.full((self.num_steps,), (1 - focus) / self.num_steps, dtype=torch.float64)
        lo, hi = self.focus_steps(focus_range)
        p[lo:hi] += focus / (hi - lo)
        return p

    def sample_timesteps(
        self,
        batch_size: int,
        device=None,
        generator: torch.Generator | None = None,
        focus: float = 0.0,
        focus_range: tuple[float, float] = DEFAULT_FOCUS_RANGE,
    ) -> torch.Tensor:
        """``(B,)`` training timesteps in ``0 .. num_steps - 1``.

        Uniform by default. With ``focus > 0``, a share ``focus`` of the batch (each element
        independently) is drawn uniformly from the steps of ``focus_steps(focus_range)`` instead:
        the loss then weights those steps more (``timestep_probabilities``). On the 7x7 toy,
        ``focus=0.3`` on the steps where a sample's mode is decided (the default range) brought
        the categorical SMD model to the data's own MMD at 20 and 50 steps, helped at 10 and
        1000 (the plain model too, at 1000), and cost at 4 steps
        (benchmarks/results/quality.md, "``timestep_focus``").
        """
        focus = _checked_focus(focus)
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_steps, (batch_size,), generator=generator, device=gen_device)
        if focus:
            # drawn after the uniform steps, so that focus=0 leaves every draw of a run as it was
            lo, hi = self.focus_steps(focus_range)
            focused = torch.randint(lo, hi, (batch_size,), generator=generator, device=gen_device)
            chosen = torch.rand(batch_size, generator=generator, device=gen_device) < focus
            t = torch.where(chosen, focused, t)
        return t.to(device)

    # ------------------------------------------------------------------ respacing
    def timesteps(self, steps: int) -> torch.Tensor:
        """``steps`` sampling timesteps, descending, "trailing" spacing (Lin et al. 2024).

        ``t_i = round(T - i T / steps) - 1`` for ``i = 0 .. steps - 1``: the first is always
        ``T - 1`` (pure noise), and ``steps == T`` gives every step. The same timesteps as
        diffusers' schedulers with ``timestep_spacing="trailing"``.
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if steps > self.num_steps:
            raise ValueError(
                f"steps={steps} is larger than the schedule's num_steps={self.num_steps}"
            )
        ratio = self.num_steps / steps
        ts = [int(round(self.num_steps - i * ratio)) - 1 for i in range(steps)]
        return torch.tensor(ts, dtype=torch.long)

    def respace(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The respaced sampling chain.

        Returns ``(timesteps, alpha_bar_t, alpha_bar_prev)``, each ``(steps,)``: the step
        ``i`` goes from ``timesteps[i]`` to ``timesteps[i + 1]`` (the last one to
        ``alpha_bar = 1``, the clean data, as diffusers' ``set_alpha_to_one``).
        """
        ts = self.timesteps(steps)
        a_t = self.alphas_cumprod[ts]
        a_prev = torch.cat([a_t[1:], a_t.new_ones(1)])
        return ts, a_t, a_prev

    def respaced_betas(self, steps: int) -> torch.Tensor:
        """The betas of the respaced chain, ``1 - alpha_bar_t / alpha_bar_prev`` (``steps``,)."""
        _, a_t, a_prev = self.respace(steps)
        return 1 - a_t / a_prev
