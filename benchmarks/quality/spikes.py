"""What makes a training batch a gradient spike: trains one run on the 7x7 grid as ``gmm.py``
does and, for every step whose gradient norm (before clipping) is over ``--factor`` times the
running mean of the norms before it (as ``TrainConfig(skip_spikes=...)`` measures it; the run
itself skips nothing), prints the batch's largest per-example losses with their ``t``, their
``x0`` and how far that ``x0`` lies from its nearest mode, in the modes' std, and the shares of
the step's gradient in the model's parts (backbone, head, the identifier's weights, its codes).

    python benchmarks/quality/spikes.py --steps 1000 --seed 1 --iters 5700 \
        --variant "smd:cat=128,pred=sample,idff=64,tail=0" --tag spikes-cat-s1

(``tail=0``: that result predates the ``"clean"`` bound's default Huber tail.)

Writes ``<out>/<tag>.md``. The training is ``gmm.py``'s to the last digit: the per-example
losses are the loss's own (``training_loss(..., reduction="none")``, whose mean is the loss),
and ``t`` is drawn from the run's generator just as ``training_loss`` would draw it (with
``floor``, the losses shown are those before the floor).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import add_run_args, build_model, parse_run_args, train, write_report  # noqa: E402

from softmix.train import SPIKE_WARMUP_STEPS, SpikeFilter  # noqa: E402


# the parts of an SMD model named in the table: the first match of each parameter's name
PARTS = (("identifier.codes", "codes"), ("identifier", "weights"), ("heads", "head"), ("denoiser.in_proj", "backbone in"),
         ("denoiser.time", "backbone time"), ("denoiser.blocks", "backbone blocks"), ("denoiser", "backbone out"))


def gradient_shares(model: torch.nn.Module) -> str:
    """The shares of the gradient's squared norm by part of the model, largest first (clipping
    scales every gradient alike, so the shares are those of the unclipped gradient)."""
    sums: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            part = next((label for prefix, label in PARTS if name.startswith(prefix)), "other")
            sums[part] = sums.get(part, 0.0) + float(p.grad.double().pow(2).sum())
    total = sum(sums.values()) or 1.0
    return ", ".join(f"{k} {100 * s / total:.0f}%" for k, s in sorted(sums.items(), key=lambda kv: -kv[1]) if s / total >= 0.01)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, iters=3000, tag="spikes")
    p.add_argument("--factor", type=float, default=10.0, help="a spike: norm over this times the running mean")
    p.add_argument("--warmup", type=int, default=SPIKE_WARMUP_STEPS, help="no spikes counted in the first this many steps")
    p.add_argument("--top", type=int, default=3, help="examples shown per spike")
    args, v, mixture, schedule = parse_run_args(p, argv)
    if v.spike or v.t0frac or v.wt or v.pred == "mixed" or v.catlast or v.wdiv or v.bound == "elbo":
        raise SystemExit(f"{args.variant}: spikes.py follows the plain training_loss path of common.train only")
    batch: dict = {}
    original = common.softmix.training_loss

    def recording_loss(model, schedule, x0, generator=None, reduction="mean", **kw):
        if "t" not in kw:  # drawn first from the same generator, as training_loss itself would
            kw["t"] = schedule.sample_timesteps(x0.shape[0], generator=generator)
        per_example = original(model, schedule, x0, generator=generator, reduction="none", **kw)
        batch.update(x0=x0, t=kw["t"], losses=per_example.detach())
        return per_example.mean() if reduction == "mean" else per_example  # (the floor asks for "none")

    rows, spikes, start = [], SpikeFilter(args.factor, args.warmup), time.perf_counter()
    torch.manual_seed(args.seed)  # initialisation, as gmm.py
    model = build_model(v, (2,))

    def on_step(step: int, ema, loss: float, grad_norm: float) -> None:
        if spikes.skip(grad_norm, step):  # (the mean is unchanged by a skip)
            mean_norm = spikes.mean
            losses, t, x0 = batch["losses"], batch["t"], batch["x0"]
            nearest = torch.cdist(x0, mixture.means).min(dim=1)
            dist = nearest.values / mixture.stds[nearest.indices]
            for rank, i in enumerate(losses.argsort(descending=True)[: args.top].tolist()):
                rows.append([str(step) if rank == 0 else "", f"{grad_norm / mean_norm:.0f}x" if rank == 0 else "",
                             f"{loss:.2f}" if rank == 0 else "", f"{losses[i]:.1f}", str(int(t[i])),
                             f"({x0[i, 0]:.3f}, {x0[i, 1]:.3f})", f"{dist[i]:.1f}",
                             f"{losses.median():.2f}" if rank == 0 else "",
                             gradient_shares(model) if rank == 0 else ""])
            print(f"[{time.perf_counter() - start:6.0f}s] step {step}: gradient norm {grad_norm:.3g} = "
                  f"{grad_norm / mean_norm:.0f}x the mean; batch loss {loss:.2f}; largest example loss "
                  f"{losses.max():.1f} at t = {int(t[losses.argmax()])}", flush=True)
            return  # a spike does not enter the running mean, as in TrainConfig(skip_spikes=...)
        spikes.took(grad_norm)

    common.softmix.training_loss = recording_loss
    try:
        train(model, v, schedule, lambda n, g: mixture.sample(n, g), args.iters, args.seed,
              on_step=on_step)
    finally:
        common.softmix.training_loss = original

    write_report(args, f"Grid, T = {args.steps}, `{args.variant}`, seed {args.seed}, {args.iters} training steps: "
                 f"the steps whose gradient norm was over {args.factor:g}x the running mean, and their {args.top} "
                 "largest per-example losses (`x0`'s distance to its nearest mode in the modes' std), and "
                 "where the step's gradient lies (shares of its squared norm by part of the model).",
                 ["step", "norm / mean", "batch loss", "example loss", "t", "x0", "distance", "median loss",
                  "gradient by part"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
