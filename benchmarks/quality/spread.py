"""How widely does a model spread its samples *within* a mode of the 7x7 grid?

The high-quality share (within 3 std of a mode) and the MMD (bandwidths 0.05-1) hardly see
whether a model's samples inside a mode are as wide as the mode (std 0.033) or packed near its
centre. This trains each variant (``common.py`` syntax, 3000 steps, seed 0) at T steps and
prints, besides those metrics, the std per coordinate of the high-quality samples around their
nearest mode's centre; first the same for 2000 fresh data, the floor of each metric.

Two more columns split the MMD: ``chi2``, how unevenly the samples fall on the 49 modes (the
chi-squared statistic of their counts per nearest mode against equal shares; for fresh data
about its 48 degrees of freedom), and ``mmd-shares``, the MMD of the same counts per mode drawn
from the true modes, which keeps only how the samples share out over the modes: what is left of
the MMD above it comes from where they sit inside and between the modes.

    python benchmarks/quality/spread.py 4 plain "smd:cat=128,pred=sample" "smd:cat=128,pred=sample,xnoise=1"
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from softmix import NoiseSchedule  # noqa: E402
from softmix.data import gmm  # noqa: E402
from softmix.metrics import mixture_metrics, quality_radius  # noqa: E402


def within_mode_std(x: torch.Tensor, mixture) -> float:
    """Std per coordinate (mean over coordinates) of the high-quality samples (as
    ``mixture_metrics`` counts them: within ``quality_radius`` stds of their nearest mode),
    around that mode's centre."""
    dist, nearest = torch.cdist(x, mixture.means).min(1)
    good = dist <= quality_radius(x.shape[1]) * mixture.stds[nearest]
    return float((x[good] - mixture.means[nearest[good]]).std(0).mean())


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    mixture = gmm("grid")
    reference = mixture.sample(2000, torch.Generator().manual_seed(123))
    steps = int(argv[0])
    for seed in (124, 125, 126):  # the metrics' floor: fresh data against the reference
        fresh = mixture.sample(2000, torch.Generator().manual_seed(seed))
        m = mixture_metrics(fresh, mixture, reference)
        chi2, shares = common.mode_shares(fresh, mixture, reference, 200 + seed)
        print(f"data (seed {seed}): hq {100 * m['high_quality']:.1f}% modes {m['modes_covered']} mmd {m['mmd']:.4f} "
              f"within-mode std {within_mode_std(fresh, mixture):.4f} chi2 {chi2:.1f} mmd-shares {shares:.4f}")
    for spec in argv[1:]:
        v = common.Variant.parse(spec)
        schedule = NoiseSchedule(steps)
        ema = common.train_on_grid_seed0(v, schedule, mixture)
        x = common.draw_samples(ema, v, schedule, (2000, 2), 0, lambda n, g: mixture.sample(n, g))
        m = mixture_metrics(x, mixture, reference)
        chi2, shares = common.mode_shares(x, mixture, reference, 300)
        print(f"T={steps} {spec}: hq {100 * m['high_quality']:.1f}% modes {m['modes_covered']} "
              f"mmd {m['mmd']:.4f} within-mode std {within_mode_std(x, mixture):.4f} "
              f"chi2 {chi2:.1f} mmd-shares {shares:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
