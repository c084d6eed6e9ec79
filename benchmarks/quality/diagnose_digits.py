"""Where does a digits model's step fall short? Each step measured on true ``x_t``, against the
exact posterior of the training set.

    python benchmarks/quality/diagnose_digits.py --steps 10 --iters 6000 --variant "plain:hidden=32,pred=sample"
    python benchmarks/quality/diagnose_digits.py --steps 10 --iters 6000 --variant "smd:hidden=32,cat=64,pred=sample,bound=posterior"

Trains one variant on the 1797 digits exactly as ``digits.py`` does (same seed, so the chain's
FD is ``digits.py``'s), then, for every step ``t``, noises ``--num`` training digits to ``x_t``.
The posterior ``q(x0 = x_i | x_t)`` over the training digits is exact (``oracle.py``), and it is
what training fits: the plain model's loss is least at its mean. Per step (sums over the 64
pixels, data in [-1, 1]):

- ``eff points`` / ``eff classes``: ``exp(H)`` of the posterior over the digits, and over their
  10 classes (the posterior weights summed per class): how many images, and how many kinds of
  digit, ``x_t`` still leaves open;
- ``post var``: ``E |x0 - E[x0 | x_t]|^2``, the error of the exact mean, the least loss of any
  plain model;
- ``excess``: ``E |m(x_t) - E[x0 | x_t]|^2``, how far the model's mean ``m`` is from the exact one
  (a categorical model's ``m = sum_k pi_k x0_k``): its loss above ``post var``, the fit error;
- categorical only: ``spread``, ``E sum_k pi_k |x0_k - m|^2``, the variance the mixture puts
  around its mean (the exact step's is ``post var``); ``eff K``, ``exp(H(pi))``; ``mix classes``,
  ``exp(H)`` of the classes of the components' ``x0_k`` (the ``digits.py`` classifier), weighted
  by ``pi``, against ``eff classes``;
- ``KL exact mean`` and ``KL``, steps ``t > 0``: the KL divergence in nats of a step
  ``p(x_{t-1} | x_t)`` from the exact step ``q(x_{t-1} | x_t)`` (the mixture over the training
  digits of the Gaussians ``N(mu_t(x_i), sigma_t^2)``), estimated by Monte Carlo with one draw of
  the exact step per noised digit. ``KL exact mean`` is that of the Gaussian step at the exact
  mean, the best plain step: what a mixture step can win at ``t`` at most. ``KL`` is the model's
  own step (the plain model's Gaussian, or the categorical model's mixture), fit error included.
  Both are measured in ``x0`` units, ``(x_{t-1} - a x_t) / c_t``, where every component has the
  width ``sigma_t / c_t``; the draws use a generator of their own, so the other columns are
  those of the diagnosis without the KL.

A mixture that has learned the step's modes has ``spread`` near ``post var`` and ``mix classes``
near ``eff classes``; one that has collapsed onto its mean has ``spread`` near 0, and is the
plain model. Prints the table and writes ``<out>/<tag>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Variant, draw_samples, markdown_table  # noqa: E402
from digits import batch_sampler, image_metrics, train_classifier, train_on_digits  # noqa: E402
from oracle import log_posterior_weights  # noqa: E402

from softmix import NoiseSchedule  # noqa: E402
from softmix.data import digits  # noqa: E402
from softmix.loss import step_precision  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def x0_width_squared(schedule: NoiseSchedule, t: int, features: int) -> float:
    """``sigma_t^2 / c_t^2``: the variance per pixel of a step's Gaussian ``N(mu_t(x0), sigma_t^2)``
    in ``x0`` units (``mu_t`` has slope ``c_t`` in ``x0``), from ``k_t = F c_t^2 / (2 sigma_t^2)``."""
    return features / (2 * float(step_precision(schedule, torch.tensor([t]), features, "sample", min_variance=0.0)))


def log_gaussians(y: torch.Tensor, centres: torch.Tensor, variance: float) -> torch.Tensor:
    """``-|y_b - c_j|^2 / (2 variance)`` for ``y (b, F)`` and ``centres (N, F)``: (b, N), no (b, N, F) tensor."""
    sq = y.square().sum(1, keepdim=True) - 2 * y @ centres.T + centres.square().sum(1)
    return -sq.clamp_min(0) / (2 * variance)


def entropy_exp(p: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` per row of probabilities ``p (b, n)``: the effective number of outcomes."""
    return torch.exp(-(p * p.clamp_min(1e-300).log()).sum(1))


@torch.no_grad()
def step_report(model, schedule: NoiseSchedule, points: torch.Tensor, labels: torch.Tensor, classify, t: int,
                num: int, gen: torch.Generator, kl_gen: torch.Generator, chunk: int = 250) -> dict:
    """The model's step ``t`` on ``num`` noised training digits (see the module docstring);
    ``kl_gen`` draws the exact steps of the KL columns."""
    flat = points.flatten(1).double()
    a = schedule.alphas_cumprod[t].double()
    x0 = flat[torch.randint(0, len(flat), (num,), generator=gen)]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    log_w = log_posterior_weights(x_t, flat, a.expand(num))
    w = log_w.exp()  # (num, N)
    mean = w @ flat
    # one draw of the exact step per row, in x0 units: a posterior digit plus the step's own noise
    # (t = 0 has none: its step is deterministic, so no KL)
    width2 = x0_width_squared(schedule, t, flat.shape[1]) if t > 0 else 0.0
    y = flat[torch.multinomial(w.float(), 1, generator=kl_gen).squeeze(1)]
    y = y + width2**0.5 * torch.randn(y.shape, generator=kl_gen, dtype=torch.float64)
    log_exact = torch.logsumexp(log_w + log_gaussians(y, flat, width2), 1) if t > 0 else None
    per_class = torch.zeros(num, 10, dtype=torch.float64).index_add_(1, labels, w)
    row = {"eff_points": float(entropy_exp(w).mean()), "eff_classes": float(entropy_exp(per_class).mean()),
           "post_var": float((w @ flat.square()).sum(1).sub(mean.square().sum(1)).mean())}
    categorical = getattr(model, "categorical", False)
    excess, spread, eff_k, mix_classes, log_model = [], [], [], [], []
    for rows, mu, y_rows in zip(x_t.float().split(chunk), mean.split(chunk), y.split(chunk)):
        b, tt = len(rows), torch.full((len(rows),), t)
        images = rows.reshape(b, *points.shape[1:])
        if categorical:
            k = model.identifier.num_components
            comps = model(images, tt, components=True).reshape(k, b, -1).double()
            pi = model.last_log_weights.double().exp().T  # (K, b)
            model.last_log_weights = None
            m = (pi.unsqueeze(2) * comps).sum(0)
            spread.append((pi * (comps - m).square().sum(2)).sum(0))
            eff_k.append(entropy_exp(pi.T))
            classes = classify(comps.reshape(k * b, *points.shape[1:]).float()).reshape(k, b)
            # the weight of each class among the components: (b, 10)
            mix = torch.zeros(k, b, 10, dtype=torch.float64).scatter_(2, classes.unsqueeze(2), pi.unsqueeze(2)).sum(0)
            mix_classes.append(entropy_exp(mix))
            if t > 0:  # log sum_k pi_k N(y; x0_k, width2): the components' log densities (K, b)
                log_k = -(y_rows.unsqueeze(0) - comps).square().sum(2) / (2 * width2)
                log_model.append(torch.logsumexp(pi.clamp_min(1e-300).log() + log_k, 0))
        else:
            m = model(images, tt).flatten(1).double()
            if t > 0:
                log_model.append(-(y_rows - m).square().sum(1) / (2 * width2))
        excess.append((m - mu).square().sum(1))
    row["excess"] = float(torch.cat(excess).mean())
    if t > 0:  # the normalising constants of the Gaussians are the same in all three and cancel
        row["kl_exact_mean"] = float((log_exact + (y - mean).square().sum(1) / (2 * width2)).mean())
        row["kl"] = float((log_exact - torch.cat(log_model)).mean())
    if categorical:
        row.update(spread=float(torch.cat(spread).mean()), eff_components=float(torch.cat(eff_k).mean()),
                   mix_classes=float(torch.cat(mix_classes).mean()))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=6000)
    p.add_argument("--num", type=int, default=1000, help="samples (chain) and noised digits per step")
    p.add_argument("--variant", default="smd:hidden=32,cat=64,pred=sample,bound=posterior")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=None, help="default: diagnose-digits-<plain|cat>-T<steps>")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    v = Variant.parse(args.variant)
    if v.pred != "sample":
        raise SystemExit("diagnose_digits.py measures predictions of x0: give the variant pred=sample")
    if v.smd and not v.cat:
        raise SystemExit("diagnose_digits.py measures plain models and categorical SMD ones (cat=K)")
    from sklearn.datasets import load_digits

    data, labels = digits(), torch.from_numpy(load_digits().target).long()
    clf = train_classifier(data, labels)

    def classify(x):
        return clf(x).argmax(1)

    schedule, draw = NoiseSchedule(args.steps), batch_sampler(data)
    _, ema, _ = train_on_digits(v, schedule, draw, args.iters, args.seed)
    chain = {k: float(x) for k, x in image_metrics(draw_samples(ema, v, schedule, (args.num, 1, 8, 8), args.seed, draw),
                                                   data, labels, clf).items()}
    gen, kl_gen = torch.Generator().manual_seed(40_000 + args.seed), torch.Generator().manual_seed(50_000 + args.seed)
    steps = {t: step_report(ema, schedule, data, labels, classify, t, args.num, gen, kl_gen) for t in range(args.steps)}

    cat = "spread" in steps[0]
    header = (["t", "eff points", "eff classes", "post var", "excess"] + (["spread", "eff K", "mix classes"] if cat else [])
              + ["KL exact mean", "KL"])
    rows = [[str(t), f"{r['eff_points']:.1f}", f"{r['eff_classes']:.2f}", f"{r['post_var']:.2f}", f"{r['excess']:.2f}"]
            + ([f"{r['spread']:.2f}", f"{r['eff_components']:.1f}", f"{r['mix_classes']:.2f}"] if cat else [])
            + ([f"{r['kl_exact_mean']:.3f}", f"{r['kl']:.3f}"] if "kl" in r else ["–", "–"])
            for t, r in reversed(steps.items())]
    md = (f"`{v.name}`, T = {args.steps}, seed {args.seed}, {args.iters} training steps. Whole chain: "
          f"FD {chain['fd']:.2f}, precision {chain['precision']:.3f}, recall {chain['recall']:.3f}.\n\n"
          f"Each step on {args.num} noised training digits (first row: the first step of the chain):\n\n"
          + markdown_table(header, rows))
    print(md)
    out = Path(args.out)
    tag = args.tag or f"diagnose-digits-{'cat' if cat else 'plain'}-T{args.steps}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/quality/diagnose_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{tag}.md").write_text(f"<!-- {cmd} -->\n\n{md}")
    (out / f"{tag}.json").write_text(json.dumps({"command": cmd, "chain": chain, "steps": steps}, indent=1) + "\n")
    print(f"wrote {out / (tag + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
