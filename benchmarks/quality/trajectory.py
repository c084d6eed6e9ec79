"""How one model's samples change over training: the 7x7 grid metrics of the EMA model every
``--every`` training steps, for one variant, T and seed (the same run as ``gmm.py``'s).

    python benchmarks/quality/trajectory.py --steps 1000 --seed 1 --iters 9000 --every 1000 \
        --variant "smd:cat=128,pred=sample,idff=64,xfit=1,tmid=0.3" --tag trajectory-...

Prints one row per evaluation (``hq``, ``modes``, ``mmd``, ``mmd-shares``, ``chi2``, as in
``gmm.py``; the samples of each evaluation drawn with the seed ``gmm.py`` uses; then the mean
and largest training loss and the largest gradient norm, before clipping, since the last row)
and writes ``<out>/<tag>.md``. The last row is ``gmm.py``'s result for the same run: evaluating does not
touch the training's generator.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_run_args, build_model, draw_samples, mode_shares, parse_run_args, train, write_report)

from softmix.metrics import mixture_metrics  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, iters=9000, tag="trajectory")
    p.add_argument("--every", type=int, default=1000, help="evaluate every this many training steps")
    p.add_argument("--num", type=int, default=2000, help="samples per evaluation")
    args, v, mixture, schedule = parse_run_args(p, argv)
    draw_data = lambda n, g: mixture.sample(n, g)  # noqa: E731
    reference = mixture.sample(args.num, torch.Generator().manual_seed(20_000 + args.seed))
    rows, window, start = [], [], time.perf_counter()

    def evaluate(step: int, ema, loss: float, grad_norm: float) -> None:
        window.append((loss, grad_norm, step))
        if step % args.every and step != args.iters:
            return
        x = draw_samples(ema, v, schedule, (args.num, 2), args.seed, draw_data)
        m = mixture_metrics(x, mixture, reference)
        chi2, mmd_shares = mode_shares(x, mixture, reference, 60_000 + args.seed)
        losses = torch.tensor([w[0] for w in window])
        top = max(window, key=lambda w: w[1])
        rows.append([str(step), f"{100 * m['high_quality']:.1f}", f"{m['modes_covered']:.0f}", f"{m['mmd']:.4f}",
                     f"{mmd_shares:.4f}", f"{chi2:.1f}", f"{losses.mean():.4g}", f"{losses.max():.4g}",
                     f"{top[1]:.3g} (step {top[2]})"])
        window.clear()
        print(f"[{time.perf_counter() - start:7.0f}s] " + " | ".join(rows[-1]), flush=True)

    torch.manual_seed(args.seed)  # initialisation, as gmm.py
    train(build_model(v, (2,)), v, schedule, draw_data, args.iters, args.seed, on_step=evaluate)

    write_report(args, f"Grid, T = {args.steps}, `{args.variant}`, seed {args.seed}; the EMA model's samples "
                 f"({args.num}) every {args.every} training steps.",
                 ["training step", "hq %", "modes", "mmd", "mmd-shares", "chi2", "mean loss", "max loss",
                  "max gradient norm"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
