"""Reproduce the quality tables of ``benchmarks/results/quality.md``.

    python benchmarks/quality/run_all.py                 # headline: 7x7 grid, T = 4, 10, 1000 (~15-20 min, 2 cores)
    python benchmarks/quality/run_all.py --ablations     # + the ablations at T = 4
    python benchmarks/quality/run_all.py --full          # T = 2, 4, 10, 20, 50, 1000 and 5 seeds (hours on CPU)

Each part is one ``benchmarks/quality/gmm.py`` process (one per T, so ``--jobs 2`` uses two
cores); each writes ``<out>/<tag>.md``, ``.json`` and ``.png``; the runner then writes
``<out>/quality-gmm.md`` with every table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"

HEADLINE = "plain ddim paper smd"
ABLATIONS = " ".join([
    # the bound, at the same M
    "smd:bound=jensen,M=16", "smd:bound=logmeanexp,M=16", "smd:bound=logmeanexp,M=4", "smd:bound=posterior,M=16",
    # M (quality and time), posterior bound
    "smd:bound=posterior,M=2", "smd:bound=posterior,M=4", "smd:bound=posterior,M=8",
    # eta removed: z from x_t alone
    "smd:noeta=1",
    # capacity: a plain model with as many parameters as the SMD model (hidden 134: 150k)
    "plain:hidden=134",
    # injection points: input and output
    "smd:inject=auto",
    # a per-step conditional VAE (posterior encoder + KL) instead of a Monte Carlo bound
    "smd:bound=elbo",
])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ablations", action="store_true", help="also run the ablation table at T=4")
    p.add_argument("--full", action="store_true", help="all T in 2,4,10,20,50,1000 and 5 seeds")
    p.add_argument("--seeds", default=None, help="default 0,1,2 (--full: 0..4)")
    p.add_argument("--ablation-seeds", default="0")
    p.add_argument("--steps", default=None, help="comma-separated T for the headline (default 4,10,1000)")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (one torch thread each)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    steps = [2, 4, 10, 20, 50, 1000] if args.full else [4, 10, 1000]
    if args.steps:
        steps = [int(t) for t in args.steps.split(",")]
    seeds = args.seeds or ("0,1,2,3,4" if args.full else "0,1,2")
    common = ["--iters", str(args.iters), "--out", args.out, "--threads", "1"]
    jobs = [[sys.executable, str(HERE / "gmm.py"), "--steps", str(t), "--seeds", seeds, "--variants", HEADLINE,
             "--tag", f"quality-gmm-T{t}", *common] for t in steps]
    if args.ablations:
        jobs.append([sys.executable, str(HERE / "gmm.py"), "--steps", "4", "--seeds", args.ablation_seeds,
                     "--variants", ABLATIONS, "--tag", "quality-gmm-ablations", *common])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    running: list[tuple[subprocess.Popen, list[str]]] = []
    failed = 0
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < args.jobs:
            cmd = pending.pop(0)
            log = open(out / (cmd[cmd.index("--tag") + 1] + ".log"), "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), cmd))
        time.sleep(2)
        for proc, cmd in list(running):
            if proc.poll() is not None:
                running.remove((proc, cmd))
                tag = cmd[cmd.index("--tag") + 1]
                print(f"[{time.time() - t0:6.0f}s] {tag}: exit {proc.returncode}", flush=True)
                failed += proc.returncode != 0
    tags = [cmd[cmd.index("--tag") + 1] for cmd in jobs]
    parts = [f"## {tag}\n\n" + (out / f"{tag}.md").read_text() for tag in tags if (out / f"{tag}.md").exists()]
    (out / "quality-gmm.md").write_text("# 7x7 grid: all tables\n\n" + "\n".join(parts))
    print((out / "quality-gmm.md").read_text())
    print(f"total {time.time() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
