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
  by ``pi``, against ``eff classes``.

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

RESULTS = Path(__file__).resolve().parents[1] / "results"


def entropy_exp(p: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` per row of probabilities ``p (b, n)``: the effective number of outcomes."""
    return torch.exp(-(p * p.clamp_min(1e-300).log()).sum(1))


@torch.no_grad()
def step_report(model, schedule: NoiseSchedule, points: torch.Tensor, labels: torch.Tensor, classify, t: int,
                num: int, gen: torch.Generator, chunk: int = 250) -> dict:
    """The model's step ``t`` on ``num`` noised training digits (see the module docstring)."""
    flat = points.flatten(1).double()
    a = schedule.alphas_cumprod[t].double()
    x0 = flat[torch.randint(0, len(flat), (num,), generator=gen)]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    w = log_posterior_weights(x_t, flat, a.expand(num)).exp()  # (num, N)
    mean = w @ flat
    per_class = torch.zeros(num, 10, dtype=torch.float64).index_add_(1, labels, w)
    row = {"eff_points": float(entropy_exp(w).mean()), "eff_classes": float(entropy_exp(per_class).mean()),
           "post_var": float((w @ flat.square()).sum(1).sub(mean.square().sum(1)).mean())}
    categorical = getattr(model, "categorical", False)
    excess, spread, eff_k, mix_classes = [], [], [], []
    for rows, mu in zip(x_t.float().split(chunk), mean.split(chunk)):
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
        else:
            m = model(images, tt).flatten(1).double()
        excess.append((m - mu).square().sum(1))
    row["excess"] = float(torch.cat(excess).mean())
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
    gen = torch.Generator().manual_seed(40_000 + args.seed)
    steps = {t: step_report(ema, schedule, data, labels, classify, t, args.num, gen) for t in range(args.steps)}

    cat = "spread" in steps[0]
    header = ["t", "eff points", "eff classes", "post var", "excess"] + (["spread", "eff K", "mix classes"] if cat else [])
    rows = [[str(t), f"{r['eff_points']:.1f}", f"{r['eff_classes']:.2f}", f"{r['post_var']:.2f}", f"{r['excess']:.2f}"]
            + ([f"{r['spread']:.2f}", f"{r['eff_components']:.1f}", f"{r['mix_classes']:.2f}"] if cat else [])
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
