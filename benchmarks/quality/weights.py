"""How sharply do a categorical model's weights follow ``x_t``, step by step?

A categorical SMD model draws component ``k`` with weight ``pi_k(x_t, t)``. Late in a chain
``x_t`` is close to ``x0``, so nearly all the weight should sit on components near ``x0``. This
trains each variant (``common.py`` syntax, 3000 steps, seed 0, as ``gmm.py`` seed 0) on the 7x7
grid at T steps and prints, per ``t``, the share of the weight on components within 0.1 of the
clean ``x0`` (1000 fresh ``x0``, the modes are 0.33 apart) and the share of examples with at
least one component that near.

Two more rows compare the weights, summed per mode (each component counts for the mode nearest
its ``x0`` estimate), with the true posterior over the modes, ``p(j | x_t)``, known in closed
form for a Gaussian mixture: their total variation distance (0: exact), and how unevenly they
share out over the modes on average, ``std_j(K_modes * mean_x_t m_j)`` (0: evenly; the same
for the true posterior, shown beside it, is the sampling noise of the 1000 ``x0``). A step that
favours some modes on average moves samples towards them, and a long chain adds it up.

    python benchmarks/quality/weights.py 1000 "smd:cat=128,pred=sample" "smd:cat=128,pred=sample,idff=64"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from softmix import NoiseSchedule  # noqa: E402
from softmix.data import gmm  # noqa: E402
from softmix.metrics import true_posterior  # noqa: E402

NEAR = 0.1


@torch.no_grad()
def weight_near_x0(model, schedule: NoiseSchedule, x0: torch.Tensor, t: int, generator: torch.Generator):
    """``(mean weight on components within NEAR of x0, share of x0 with such a component)`` at step ``t``."""
    n = x0.shape[0]
    a = schedule.alphas_cumprod[t]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
    out = model(x_t, torch.full((n,), t), components=True).reshape(-1, *x0.shape)  # (K, n, F)
    pi = model.last_log_weights.exp()  # (n, K)
    near = ((out - x0).norm(dim=-1).T < NEAR).double()  # (n, K)
    return float((pi * near).sum(1).mean()), float(near.amax(1).mean())


@torch.no_grad()
def mode_calibration(model, mixture, schedule: NoiseSchedule, x0: torch.Tensor, t: int,
                     generator: torch.Generator) -> tuple[float, float, float]:
    """``(TV, spread, spread of the truth)`` at step ``t``: the weights summed per mode against
    the true posterior over the modes (see the module docstring)."""
    n, modes = x0.shape[0], mixture.num_modes
    a = schedule.alphas_cumprod[t].double()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
    out = model(x_t, torch.full((n,), t), components=True).reshape(-1, *x0.shape)  # (K, n, F)
    pi = model.last_log_weights.exp().double()  # (n, K)
    component_mode = torch.cdist(out.double(), mixture.means.double()).argmin(-1).T  # (n, K)
    per_mode = torch.zeros(n, modes, dtype=torch.float64).scatter_add_(1, component_mode, pi)
    truth = true_posterior(mixture, x_t, float(a), 1.0)[0].exp()  # p(j | x_t), (n, modes)
    tv = float(0.5 * (per_mode - truth).abs().sum(1).mean())
    return tv, float((modes * per_mode.mean(0)).std()), float((modes * truth.mean(0)).std())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("steps", type=int, help="T, trained and probed")
    p.add_argument("variants", nargs="+", help="categorical variants, common.py syntax")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mixture, steps = gmm("grid"), args.steps
    ts = sorted({t for t in (0, 5, 20, 50, 100, 400, steps - 1) if t < steps})
    schedule = NoiseSchedule(steps)
    noise = " | ".join(f"{float((1 - schedule.alphas_cumprod[t]).sqrt()):.3f}" for t in ts)
    print("| t | " + " | ".join(map(str, ts)) + " |")
    print("|---|" + "---|" * len(ts))
    print(f"| noise of x_t | {noise} |", flush=True)
    for spec in args.variants:
        v = common.Variant.parse(spec)
        if not v.cat:
            raise ValueError(f"{spec}: weights.py needs a categorical variant (cat=K)")
        ema = common.train_on_grid_seed0(v, schedule, mixture)
        g = torch.Generator().manual_seed(5)
        x0 = mixture.sample(1000, g)
        rows = [weight_near_x0(ema, schedule, x0, t, g) for t in ts]
        print(f"| `{spec}`: weight near x0 | " + " | ".join(f"{w:.3f}" for w, _ in rows) + " |")
        print(f"| `{spec}`: some component near x0 | " + " | ".join(f"{c:.3f}" for _, c in rows) + " |", flush=True)
        calib = [mode_calibration(ema, mixture, schedule, x0, t, g) for t in ts]
        print(f"| `{spec}`: weights per mode, TV from p(mode given x_t) | " + " | ".join(f"{c[0]:.3f}" for c in calib) + " |")
        print(f"| `{spec}`: spread of the mean weight per mode (truth) | "
              + " | ".join(f"{c[1]:.3f} ({c[2]:.3f})" for c in calib) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
