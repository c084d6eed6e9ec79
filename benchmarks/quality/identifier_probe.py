"""Can the categorical identifier's image network tell which digit ``x_t`` is? A probe of its
weights' network, away from any mixture.

    python benchmarks/quality/identifier_probe.py --steps 10 --at 1,2,3,4

The categorical identifier picks its component with weights ``pi(x_t, t)`` computed, for images,
by two 3x3 convolutions averaged over positions (``CategoricalIdentifier``). Here a net of that
shape (width 128, the library's), with its logits cut to the 10 digit classes, is trained to
tell the class of a training digit from its noised ``x_t`` at one step ``t`` (fresh noise every
batch, 3000 Adam steps of 128); beside it the same convolutions with the positions kept
(flattened through one Linear, ``common.py``'s ``idflat``); and, as the best any net can do,
the exact posterior over the 1797 training digits (``oracle.py``), summed per class. Measured
on every training digit under one fresh draw of noise: cross-entropy of the true class (nats)
and accuracy. Prints the table and writes ``<out>/<tag>.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_report  # noqa: E402
from oracle import log_posterior_weights  # noqa: E402

from softmix import NoiseSchedule  # noqa: E402
from softmix.data import digits  # noqa: E402


class ClassProbe(nn.Module):
    """The identifier's image network (``CategoricalIdentifier``, ``spatial_dims=2``) with 10
    outputs; ``pool=False`` keeps the positions (``identifier_grid`` at the features' own size)."""

    def __init__(self, pool: bool, hidden: int = 128, positions: int = 16):
        super().__init__()
        self.pool = pool
        self.features = nn.Sequential(nn.Conv2d(1, hidden, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(hidden, hidden, 3, padding=1, stride=2))
        self.flat_proj = None if pool else nn.Linear(positions * hidden, hidden)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(h.flatten(2).mean(-1) if self.pool else self.flat_proj(h.flatten(1)))


def noised(x0: torch.Tensor, alpha_bar: torch.Tensor, g: torch.Generator, n: int | None = None):
    """``n`` digits drawn with replacement (all, in order, when ``n`` is None), noised: ``(x_t, index)``."""
    idx = torch.randint(0, len(x0), (n,), generator=g) if n else torch.arange(len(x0))
    x = x0[idx]
    return alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * torch.randn(x.shape, generator=g), idx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="T of the chain")
    p.add_argument("--at", default="1,2,3,4", help="comma-separated steps t to probe")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="identifier-probe-digits-T10")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sklearn.datasets import load_digits

    x0, labels = digits(), torch.from_numpy(load_digits().target).long()
    alpha_bar = NoiseSchedule(args.steps).alphas_cumprod
    rows = []
    for t in (int(s) for s in args.at.split(",")):
        x_eval, idx = noised(x0, alpha_bar[t], torch.Generator().manual_seed(123))
        y_eval = labels[idx]
        log_w = log_posterior_weights(x_eval.flatten(1), x0.flatten(1), alpha_bar[t].expand(len(x_eval)))
        log_class = torch.stack([torch.logsumexp(log_w[:, labels == c], 1) for c in range(10)], 1)
        row = [str(t), f"{float(-log_class.gather(1, y_eval[:, None]).mean()):.3f}",
               f"{float((log_class.argmax(1) == y_eval).float().mean()):.3f}"]
        for pool in (True, False):
            torch.manual_seed(0)
            net, g = ClassProbe(pool), torch.Generator().manual_seed(1)
            opt = torch.optim.Adam(net.parameters(), 1e-3)
            start = time.time()
            for _ in range(args.iters):
                x, i = noised(x0, alpha_bar[t], g, 128)
                loss = nn.functional.cross_entropy(net(x), labels[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                logits = net(x_eval)
            row += [f"{float(nn.functional.cross_entropy(logits, y_eval)):.3f}",
                    f"{float((logits.argmax(1) == y_eval).float().mean()):.3f}"]
            print(f"t={t} {'pooled' if pool else 'positions kept'}: {row[-2]} nats, accuracy {row[-1]} "
                  f"({time.time() - start:.0f} s)", flush=True)
        rows.append(row)
    header = ["t", "exact posterior: CE", "acc", "identifier's net (mean over positions): CE", "acc",
              "positions kept: CE", "acc"]
    write_report(args, f"T = {args.steps}; {args.iters} training steps of 128 per probe; CE in nats on the "
                       f"1797 digits, one draw of noise.", header, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
