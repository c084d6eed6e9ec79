"""How much does the Gaussian step itself cost? Samplers driven by the exact posterior.

For data given as a finite set of points (the 1797 digits, or many draws of a toy mixture),
the posterior of ``x0`` given ``x_t`` is exact and cheap: a softmax over the points,
``p(x_i | x_t) ~ exp(-|x_t - sqrt(a_t) x_i|^2 / (2 (1 - a_t)))``. Two "models" use it in the
library's own ancestral sampler (``softmix.sample``, ``prediction_type="sample"``):

- ``mean``: predicts ``E[x0 | x_t]``. This is the best any plain model can do: its step is the
  Gaussian with the exact mean (and the fixed-small variance). What it misses is the cost of
  the Gaussian bottleneck alone, with no training error.
- ``draw``: predicts one ``x_i`` drawn from the posterior. Then ``q(x_prev | x_t, x_i)`` with
  ``x_i ~ q(x0 | x_t)`` is a draw from the exact step ``q(x_prev | x_t)``: the ideal
  categorical identifier with one component per point. It samples the data (here, the points
  themselves) at any number of steps.

So the gap between ``mean`` and the data at T steps is the most that a mixture step can gain
there. Two more samplers (``--gaussian``) ask how much of that gap a *Gaussian* step could close
with the right variance, the step's moments matched:

- ``gauss``: predicts ``x0 ~ N(E[x0 | x_t], Cov[x0 | x_t])``, so the step is
  ``N(mu_t(E[x0 | x_t]), sigma_t^2 I + c_t^2 Cov[x0 | x_t])``: the exact step's mean and
  covariance, the best single Gaussian (``c_t`` the step mean's slope in ``x0``);
- ``gaussiso``: the same with the covariance replaced by ``tr(Cov) / F`` times the identity, the
  best Gaussian with one variance per step (what Analytic-DPM estimates).

What ``draw`` gains beyond ``gauss`` is the step's shape: the part only a mixture can win.

On the empirical data the posterior concentrates on single points at low noise, so ``mean`` and
``draw`` reproduce data points late in the chain: this measures the step's shape, not a model's
generalisation.

    python benchmarks/quality/oracle.py --data digits --steps 4,10,20,50
    python benchmarks/quality/oracle.py --data grid --steps 2,4,10,20,50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, markdown_table  # noqa: E402

import softmix  # noqa: E402
from softmix import NoiseSchedule  # noqa: E402
from softmix.data import digits, gmm  # noqa: E402
from softmix.metrics import mixture_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def log_posterior_weights(x_t: torch.Tensor, points: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``log q(x0 = x_i | x_t)`` for data ``points (N, F)``, ``x_t (b, F)`` and its ``alpha_bar (b,)``: (b, N)."""
    a = alpha_bar.unsqueeze(1)
    # -|x_t - sqrt(a) x_i|^2 / (2 (1 - a)), expanded so that no (b, N, F) tensor is formed
    log_w = -0.5 * (x_t.square().sum(1, keepdim=True) - 2 * a.sqrt() * x_t @ points.T
                    + a * points.square().sum(1)) / (1 - a)
    return log_w - torch.logsumexp(log_w, dim=1, keepdim=True)


class PosteriorOracle(nn.Module):
    """A denoiser predicting ``x0`` from the exact posterior over ``points (N, *S)``.

    ``mode="mean"``: ``E[x0 | x_t]``; ``mode="draw"``: one point drawn from ``q(x0 | x_t)``;
    ``mode="draw<S"``: drawn on the steps ``t < S``, the mean on the others (which steps need
    the mixture); ``mode="gauss"``: drawn from ``N(E[x0 | x_t], Cov[x0 | x_t])``;
    ``mode="gaussiso"``: from ``N(E[x0 | x_t], tr(Cov) / F I)``. Also records, per timestep, the
    effective number of points ``exp(H)`` of the posterior.
    """

    def __init__(self, points: torch.Tensor, schedule: NoiseSchedule, mode: str, generator: torch.Generator,
                 chunk: int = 256):
        super().__init__()
        self.gaussian = mode if mode in ("gauss", "gaussiso") else ""
        if mode == "mean" or self.gaussian:
            self.draw_below = 0
        elif mode == "draw":
            self.draw_below = schedule.num_steps
        elif mode.startswith("draw<") and mode[5:].isdigit():
            self.draw_below = int(mode[5:])
        else:
            raise ValueError(f"unknown mode {mode!r}; expected 'mean', 'draw', 'draw<S', 'gauss' or 'gaussiso'")
        self.points, self.generator, self.chunk = points.double().flatten(1), generator, chunk
        self.alphas_cumprod = schedule.alphas_cumprod.double()
        self.effective: dict[int, list[float]] = {}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = []
        for rows, steps in zip(x_t.flatten(1).double().split(self.chunk), t.split(self.chunk)):
            log_w = log_posterior_weights(rows, self.points, self.alphas_cumprod[steps.long()])
            w = log_w.exp()
            entropy = -(w * log_w).sum(1)
            for step, h in zip(steps.tolist(), entropy.exp().tolist()):
                self.effective.setdefault(int(step), []).append(h)
            mean = w @ self.points
            if self.gaussian:
                out.append(mean + self.gaussian_noise(w, mean))
                continue
            pick = torch.multinomial(w.float(), 1, generator=self.generator).squeeze(1)
            out.append(torch.where((steps < self.draw_below).unsqueeze(1), self.points[pick], mean))
        return torch.cat(out).to(x_t.dtype).reshape(x_t.shape)

    def gaussian_noise(self, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """A draw of ``N(0, Cov[x0 | x_t])`` (``gauss``) or ``N(0, tr(Cov) / F I)`` (``gaussiso``)
        for posterior weights ``w (b, N)`` and means ``mean (b, F)``."""
        if self.gaussian == "gaussiso":
            variance = ((w @ self.points.square()).sum(1) - mean.square().sum(1)).clamp(min=0) / mean.shape[1]
            return variance.sqrt().unsqueeze(1) * torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype)
        # sum_i sqrt(w_i) z_i (x_i - mean) with z_i ~ N(0, 1) has covariance sum_i w_i (x_i - mean)(x_i - mean)^T,
        # the posterior's, and needs no (b, F, F) matrix
        z = w.sqrt() * torch.randn(w.shape, generator=self.generator, dtype=w.dtype)
        return z @ self.points - z.sum(1, keepdim=True) * mean


def effective_by_step(oracle: PosteriorOracle) -> dict[int, float]:
    return {t: sum(v) / len(v) for t, v in sorted(oracle.effective.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "grid"), default="digits")
    p.add_argument("--steps", default="4,10,20,50")
    p.add_argument("--seeds", default="0", help="comma-separated sampling seeds; the table gives mean ± std")
    p.add_argument("--num", type=int, default=None, help="samples per sampler (digits 1000, grid 2000, as the other scripts)")
    p.add_argument("--points", type=int, default=20000, help="grid only: draws of the mixture used as the data")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=None)
    p.add_argument("--split", default="", help="comma-separated S: also sample with the draw on steps t < S only")
    p.add_argument("--gaussian", action="store_true",
                   help="also sample with the moment-matched Gaussian steps (gauss, gaussiso)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tag = args.tag or f"oracle-{args.data}"
    seeds = [int(s) for s in args.seeds.split(",")]
    g = torch.Generator().manual_seed(seeds[0])  # the grid's data points: one set for every sampling seed
    if args.data == "digits":
        from sklearn.datasets import load_digits

        from digits import image_metrics, train_classifier

        points, labels = digits(), torch.from_numpy(load_digits().target).long()
        clf = train_classifier(points, labels)

        def metrics(x):
            return image_metrics(x, points, labels, clf)

        columns = [("FD", "fd", 2), ("prec", "precision", 3), ("rec", "recall", 3), ("class KL", "class_kl", 3)]
    else:
        mixture = gmm("grid")
        points = mixture.sample(args.points, generator=g)
        reference = mixture.sample(2000, generator=g)

        def metrics(x):
            return mixture_metrics(x, mixture, reference)

        columns = [("hq %", "high_quality", 1), ("modes", "modes_covered", 0), ("mmd", "mmd", 4)]
    num = args.num or (1000 if args.data == "digits" else 2000)
    shape = (num, *points.shape[1:])
    rows, results, t0 = [], {}, time.time()
    for steps in [int(s) for s in args.steps.split(",")]:
        schedule = NoiseSchedule(steps)
        splits = [f"draw<{s}" for s in args.split.split(",") if s and int(s) < steps]
        gaussians = ("gaussiso", "gauss") if args.gaussian else ()
        for mode in ("mean", *gaussians, *splits, "draw"):
            per_seed = []
            for seed in seeds:
                oracle = PosteriorOracle(points, schedule, mode, torch.Generator().manual_seed(seed + 1))
                x = softmix.sample(oracle, schedule, shape, steps=steps, generator=torch.Generator().manual_seed(seed),
                                   prediction_type="sample", progress=False)
                m = {k: float(v) for k, v in metrics(x).items()}
                m["effective_points"] = effective_by_step(oracle)
                per_seed.append(m)
            results[f"{mode}@{steps}"] = per_seed[0] if len(seeds) == 1 else {"seeds": seeds, "per_seed": per_seed}
            cells = [fmt([m[k] for m in per_seed], d, 100.0 if k == "high_quality" else 1.0) for _, k, d in columns]
            eff = per_seed[0]["effective_points"]
            rows.append([str(steps), f"`{mode}`", *cells, f"{eff[0]:.1f}", f"{eff[max(eff) // 2]:.1f}", f"{eff[max(eff)]:.0f}"])
            print(f"[{time.time() - t0:5.0f}s] T={steps:<3d} {mode:<5s} " + " ".join(
                f"{name}={c}" for (name, _, _), c in zip(columns, cells)), flush=True)
    header = ["T", "sampler", *[c[0] for c in columns], "points at t = 0", "at t = T/2", "at t = T-1"]
    md = markdown_table(header, rows)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/quality/oracle.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{tag}.md").write_text(f"<!-- {cmd} -->\n\n{md}")
    (out / f"{tag}.json").write_text(json.dumps({"command": cmd, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
