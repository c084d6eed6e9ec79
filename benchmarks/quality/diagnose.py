"""Where does a model's chain go wrong? Each backward step measured on *true* ``x_t``.

    python benchmarks/quality/diagnose.py --steps 10 --seed 0 --variant "smd:cat=128,pred=sample"

Trains one variant on the 7x7 grid (as ``gmm.py`` does: same backbone, budget and seeds),
samples the whole chain, and then, for every step ``t``, draws ``x_t ~ q(x_t)`` from fresh data
and measures the model's prediction of ``x0`` there: the step's quality when everything before
it was right. A step whose samples miss the modes on true inputs is broken by itself; one that
is right there but wrong in the chain inherits the error from the steps before it.

Per step (the model predicts ``x0``: ``pred=sample``):

- ``hq``: share of one drawn prediction of ``x0`` within 3 std of a mode (at ``t = 0`` the
  sampler's output for a true ``x_1``);
- for a categorical identifier: ``on mode``, the weight ``sum_k pi_k`` of the components whose
  ``x0`` lies within 3 std of a mode; ``eff K``, the effective number of components
  ``exp(H(pi))``, against ``eff modes``, that of the true posterior over the modes
  ``q(mode | x_t)`` (the mode widths ignored);
- ``err``: mean squared error of that ``x0`` to the true ``x0``, against the posterior mean's.

Prints the table and writes ``<out>/<tag>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Variant, build_model, draw_samples, markdown_table, train  # noqa: E402

from softmix import NoiseSchedule  # noqa: E402
from softmix.data import TOY_MIXTURES, GaussianMixture  # noqa: E402
from softmix.metrics import mixture_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


@torch.no_grad()
def step_report(model, schedule: NoiseSchedule, mixture: GaussianMixture, t: int, num: int,
                gen: torch.Generator) -> dict:
    """The model's step ``t`` on ``num`` true ``x_t`` (see the module docstring)."""
    means, std = mixture.means, float(mixture.stds.max())
    a = schedule.alphas_cumprod[t].float()
    x0 = mixture.sample(num, gen)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
    tt = torch.full((num,), t)
    # q(mode | x_t) for point masses at the means
    log_q = -(x_t[:, None] - a.sqrt() * means[None]).square().sum(-1) / (2 * (1 - a))
    q = torch.softmax(log_q, dim=1)
    row = {"eff_modes": float(torch.exp(-(q * log_q.log_softmax(1)).sum(1)).mean()),
           "posterior_mean_err": float((q @ means - x0).square().sum(1).mean())}
    if getattr(model, "categorical", False):
        k = model.identifier.num_components
        comps = model(x_t, tt, components=True).reshape(k, num, -1)
        log_pi = model.last_log_weights  # (num, K)
        near = torch.cdist(comps.reshape(k * num, -1), means).min(1).values.reshape(k, num) <= 3 * std
        row["on_mode"] = float((log_pi.exp().T * near).sum(0).mean())
        row["eff_components"] = float(torch.exp(-(log_pi.exp() * log_pi).sum(1)).mean())
        x0_hat = model(x_t, tt, eta=model.sample_eta(x_t, gen))
    elif hasattr(model, "sample_eta"):
        x0_hat = model(x_t, tt, eta=model.sample_eta(x_t, gen))
    else:
        x0_hat = model(x_t, tt)
    row["hq"] = float((torch.cdist(x0_hat, means).min(1).values <= 3 * std).float().mean())
    row["err"] = float((x0_hat - x0).square().sum(1).mean())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--num", type=int, default=2000, help="samples (chain) and true x_t per step")
    p.add_argument("--variant", default="smd:cat=128,pred=sample")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=None, help="default: diagnose-T<steps>")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    v = Variant.parse(args.variant)
    if v.pred != "sample":
        raise SystemExit("diagnose.py measures predictions of x0: give the variant pred=sample")
    mixture = TOY_MIXTURES["gmm"]()
    schedule = NoiseSchedule(args.steps)
    torch.manual_seed(args.seed)
    model = build_model(v, (2,))
    ema, _ = train(model, v, schedule, lambda n, g: mixture.sample(n, g), args.iters, args.seed)
    x = draw_samples(ema, v, schedule, (args.num, 2), args.seed)
    reference = mixture.sample(args.num, torch.Generator().manual_seed(20_000 + args.seed))
    chain = mixture_metrics(x, mixture, reference)
    gen = torch.Generator().manual_seed(40_000 + args.seed)
    steps = {t: step_report(ema, schedule, mixture, t, args.num, gen) for t in range(args.steps)}

    cat = "on_mode" in steps[0]
    header = ["t", "hq %"] + (["on mode %", "eff K"] if cat else []) + ["eff modes", "err", "posterior mean err"]
    rows = [[str(t), f"{100 * r['hq']:.1f}"] + ([f"{100 * r['on_mode']:.1f}", f"{r['eff_components']:.1f}"] if cat else [])
            + [f"{r['eff_modes']:.1f}", f"{r['err']:.3f}", f"{r['posterior_mean_err']:.3f}"] for t, r in steps.items()]
    md = (f"`{v.name}`, T = {args.steps}, seed {args.seed}, {args.iters} training steps. Whole chain: "
          f"hq {100 * chain['high_quality']:.1f}%, {chain['modes_covered']} of 49 modes, MMD {chain['mmd']:.4f}.\n\n"
          "Each step on true x_t:\n\n" + markdown_table(header, rows))
    print(md)
    out, tag = Path(args.out), args.tag or f"diagnose-T{args.steps}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    (out / f"{tag}.md").write_text(f"<!-- {cmd} -->\n\n{md}")
    (out / f"{tag}.json").write_text(json.dumps({"command": cmd, "chain": chain, "steps": steps}, indent=1) + "\n")
    print(f"wrote {out / (tag + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
