"""scikit-learn's 8x8 digits: SMD vs the plain model (same conv backbone and budget), trained
and sampled at T steps.

    python benchmarks/quality/digits.py --steps 4,10,50 --seeds 0 --iters 2000 --tag quality-digits

Metrics on the features of a small classifier (an MLP 64-128-64-10 trained on all 1797 digits,
retrained deterministically from seed 0 on every run, a few seconds): ``fd`` Fréchet distance
between generated and real features; ``prec`` / ``rec`` k-NN precision and recall (k = 3);
``cls_kl`` KL of the data's class histogram from the generated samples' predicted classes.

``--eval-at 1500,6000,24000`` measures the EMA model at those training steps of one run (the
last must be ``--iters``): a learning curve per variant, printed, in the table (column
``iters``) and plotted (``<tag>-curve.png``). Sampling draws from its own generator, so the
training run, and the metrics at each step, are those of a run stopped there.
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

from common import Variant, build_model, draw_samples, fmt, markdown_table, num_params, train  # noqa: E402
from curves import curves_from_results, plot_curves  # noqa: E402

from softmix import NoiseSchedule  # noqa: E402
from softmix.data import digits  # noqa: E402
from softmix.metrics import frechet_distance, knn_precision_recall  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


class DigitClassifier(nn.Module):
    """``(B, 1, 8, 8) -> logits (B, 10)``; ``features`` is the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> DigitClassifier:
    """Deterministic (seed 0, full batch, Adam); about 5 s on one CPU core."""
    torch.manual_seed(0)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def image_metrics(samples: torch.Tensor, data: torch.Tensor, labels: torch.Tensor, clf: DigitClassifier) -> dict:
    f_fake, f_real = clf.features(samples.clamp(-1, 1)), clf.features(data)
    prec, rec = knn_precision_recall(f_real, f_fake, k=3)
    hist_fake = torch.bincount(clf(samples.clamp(-1, 1)).argmax(1), minlength=10).double() + 1e-3
    hist_real = torch.bincount(labels, minlength=10).double()
    p, q = hist_real / hist_real.sum(), hist_fake / hist_fake.sum()
    return {"fd": frechet_distance(f_real, f_fake), "precision": prec, "recall": rec,
            "class_kl": float((p * (p / q).log()).sum())}


COLUMNS = [("fd", "fd", 2, 1.0), ("prec", "precision", 3, 1.0), ("rec", "recall", 3, 1.0),
           ("cls_kl", "class_kl", 3, 1.0), ("ms/it", "ms_per_iter", 1, 1.0)]


def batch_sampler(data: torch.Tensor):
    """``draw(n, generator)``: ``n`` digits drawn with replacement, the training batches."""
    return lambda n, g: data[torch.randint(0, len(data), (n,), generator=g)]


def train_on_digits(v: Variant, schedule: NoiseSchedule, draw, iters: int, seed: int, on_step=None):
    """Variant ``v`` built from ``seed`` and trained on the batches of ``draw`` (at most 128 per
    batch): ``(model, EMA model, seconds per step)``. Every digits script trains through here, so
    that one variant and seed give one model."""
    torch.manual_seed(seed)
    model = build_model(v, (1, 8, 8))
    v.bs = min(v.bs, 128)
    ema, sec = train(model, v, schedule, draw, iters, seed, on_step=on_step)
    return model, ema, sec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="4,10,50")
    p.add_argument("--seeds", default="0")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--num", type=int, default=1000, help="samples per run")
    p.add_argument("--variants", default="plain smd", help="space-separated (see common.py); hidden=64 unless given")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="quality-digits")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-at", default="", help="comma-separated training steps to measure at (default: --iters)")
    args = p.parse_args(argv)
    eval_at = [int(s) for s in args.eval_at.split(",")] if args.eval_at else [args.iters]
    if eval_at != sorted(set(eval_at)) or eval_at[0] < 1 or eval_at[-1] != args.iters:
        p.error(f"--eval-at must be increasing steps from 1 that end at --iters ({args.iters}); got {args.eval_at}")
    torch.set_num_threads(args.threads)
    from sklearn.datasets import load_digits

    data, labels = digits(), torch.from_numpy(load_digits().target).long()
    clf = train_classifier(data, labels)
    acc = float((clf(data).argmax(1) == labels).float().mean())
    print(f"classifier train accuracy {acc:.3f}; FD of real vs real (two halves): "
          f"{frechet_distance(clf.features(data[::2]).detach(), clf.features(data[1::2]).detach()):.2f}")
    steps_list = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split()
    results, samples, t0 = {}, {}, time.time()
    for steps in steps_list:
        for name in names:
            spec = name if "hidden=" in name else name + (",hidden=64" if ":" in name else ":hidden=64")
            v = Variant.parse(spec)
            schedule, draw = NoiseSchedule(steps), batch_sampler(data)
            for seed in seeds:
                measured, measuring = {}, [0.0]  # measuring: seconds spent in measure, not training

                def measure(step, ema, *_):
                    if step not in eval_at:
                        return
                    start = time.perf_counter()
                    x = draw_samples(ema, v, schedule, (args.num, 1, 8, 8), seed, draw)
                    measured[step] = (x, image_metrics(x, data, labels, clf))
                    m = measured[step][1]
                    print(f"[{time.time() - t0:6.0f}s] T={steps:<4d} {name:<30s} seed={seed} iters={step} "
                          f"fd={m['fd']:.2f} prec={m['precision']:.3f} rec={m['recall']:.3f} "
                          f"cls_kl={m['class_kl']:.3f}", flush=True)
                    measuring[0] += time.perf_counter() - start

                model, _, sec = train_on_digits(v, schedule, draw, args.iters, seed, on_step=measure)
                sec -= measuring[0] / args.iters
                for step, (x, m) in measured.items():
                    m.update(params=num_params(model), ms_per_iter=1000 * sec)
                    results.setdefault(f"{name}@{steps}@{step}", []).append(m)
                if seed == seeds[0]:
                    samples[f"{name}@{steps}"] = measured[args.iters][0]
    header = ["T", "variant"] + (["iters"] if len(eval_at) > 1 else []) + [c[0] for c in COLUMNS]
    rows = [[str(s), f"`{n}`"] + ([str(i)] if len(eval_at) > 1 else [])
            + [fmt([r[k] for r in results[f"{n}@{s}@{i}"]], d, sc) for _, k, d, sc in COLUMNS]
            for s in steps_list for n in names for i in eval_at]
    md = markdown_table(header, rows)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/quality/digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{args.tag}.md").write_text(f"<!-- {cmd} -->\n\nSeeds {seeds}, {args.iters} training iterations "
                                        f"(batch 128), {args.num} samples; classifier accuracy {acc:.3f}.\n\n{md}")
    (out / f"{args.tag}.json").write_text(json.dumps({"command": cmd, "seeds": seeds, "results": results}, indent=1) + "\n")
    from softmix.plots import _draw, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(len(steps_list), len(names), figsize=(2.6 * len(names), 2.6 * len(steps_list)), squeeze=False)
    for r, s in enumerate(steps_list):
        for c, n in enumerate(names):
            _draw(axes[r][c], samples[f"{n}@{s}"], f"{n.split(':')[0]}, T={s}")
    fig.tight_layout()
    fig.savefig(out / f"{args.tag}.png", dpi=60)
    plt.close(fig)
    if len(eval_at) > 1:
        plot_curves(curves_from_results(results, seeds), out / f"{args.tag}-curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
