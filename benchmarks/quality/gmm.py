"""The paper's toy: a 7x7 grid of 2-D Gaussians. SMD variants vs the plain model (same
backbone and budget, DDPM and DDIM sampling), each trained and sampled at T steps.

    python benchmarks/quality/gmm.py --steps 4,10 --seeds 0,1,2 --iters 3000 \
        --variants plain,ddim,paper,smd --tag quality-gmm

``--data`` picks a harder mixture (issue 4, experiment 3; ``softmix.data.gmm``): ``d8`` (16
modes at random centres in ``[-1, 1]^8``, seed 0, std a tenth of the smallest distance
between centres), ``d32`` (32 modes in ``[-1, 1]^32``, likewise), ``widths`` (the 7x7 grid,
stds from a twentieth to a fifth of the spacing: the widest mode 4x the narrowest).

Prints a table (mean ± std over seeds) and writes ``<out>/<tag>.md``, ``<tag>.json`` and
``<tag>.png`` (samples of the first seed: one row per T, one column per variant).

Metrics (``softmix.metrics.mixture_metrics``): ``hq`` share of samples within 3 std of their
nearest mode; ``modes`` modes nearest to at least 20% of the high-quality samples a mode would
get; ``mmd`` squared MMD to fresh true samples; ``mmd-shares`` the same for a draw from the true
modes with the samples' counts per nearest mode, and ``chi2`` the chi-squared statistic of
those counts against equal shares (``common.mode_shares``: how much of the MMD is how the
samples share out over the modes); ``nll`` mean negative log-likelihood of the
samples under the true mixture; with ``--kl``, the per-step KL from the true posterior
``q(x_{t-1} | x_t)`` averaged over the chain (``softmix.metrics.posterior_kl``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Variant, build_model, draw_samples, fmt, markdown_table, mode_shares, num_params, train  # noqa: E402

from softmix import NoiseSchedule  # noqa: E402
from softmix.data import TOY_MIXTURES  # noqa: E402
from softmix.metrics import mixture_metrics, posterior_kl  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


DATASETS = {name: TOY_MIXTURES["gmm" if name == "grid" else f"gmm-{name}"] for name in ("grid", "d8", "d32", "widths")}


def run_one(v: Variant, steps: int, seed: int, iters: int, num: int, mixture, kl: bool) -> dict:
    torch.manual_seed(seed)  # initialisation
    schedule = NoiseSchedule(steps)
    dims = mixture.means.shape[1]
    model = build_model(v, (dims,))
    ema, sec_per_iter = train(model, v, schedule, lambda n, g: mixture.sample(n, g), iters, seed)
    x = draw_samples(ema, v, schedule, (num, dims), seed, lambda n, g: mixture.sample(n, g))
    reference = mixture.sample(num, torch.Generator().manual_seed(20_000 + seed))
    out = mixture_metrics(x, mixture, reference)
    out["chi2"], out["mmd_shares"] = mode_shares(x, mixture, reference, 60_000 + seed)
    out.update(params=num_params(model), ms_per_iter=1000 * sec_per_iter)
    if kl:
        out["kl"] = posterior_kl(ema, schedule, mixture, num=512, num_eta=256,
                                 generator=torch.Generator().manual_seed(30_000 + seed))
    return {"metrics": out, "samples": x}


COLUMNS = [("hq", "high_quality", 1, 100.0), ("modes", "modes_covered", 1, 1.0), ("mmd", "mmd", 4, 1.0),
           ("mmd-shares", "mmd_shares", 4, 1.0), ("chi2", "chi2", 1, 1.0),
           ("nll", "nll", 2, 1.0), ("kl", "kl", 2, 1.0), ("ms/it", "ms_per_iter", 1, 1.0)]


def table(results: dict, variants: list[str], steps_list: list[int]) -> str:
    every_run = [m for runs in results.values() for m in runs]
    cols = [c for c in COLUMNS if all(c[1] in m for m in every_run)]  # kl only with --kl
    header = ["T", "variant"] + [("hq %" if c[0] == "hq" else c[0]) for c in cols]
    rows = []
    for steps in steps_list:
        for name in variants:
            runs = results.get(f"{name}@{steps}", [])
            if not runs:
                continue
            rows.append([str(steps), f"`{name}`"] + [fmt([r[key] for r in runs], d, sc) for _, key, d, sc in cols])
    return markdown_table(header, rows)


def plot(samples: dict, variants: list[str], steps_list: list[int], data: torch.Tensor, path: Path) -> None:
    from softmix.plots import _draw, _pyplot

    plt = _pyplot()
    rows, cols = len(steps_list), len(variants) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for r, steps in enumerate(steps_list):
        _draw(axes[r][0], data, f"data (T={steps})")
        for c, name in enumerate(variants, start=1):
            x = samples.get(f"{name}@{steps}")
            if x is not None:
                _draw(axes[r][c], x, f"{name.split(':')[0]}, T={steps}")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="4,10,1000", help="comma-separated T (trained and sampled at T)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--num", type=int, default=2000, help="samples per run")
    p.add_argument("--variants", default="plain,ddim,paper,smd",
                   help="comma-free list separated by ';' or ' ' (see benchmarks/quality/common.py)")
    p.add_argument("--data", default="grid", choices=sorted(DATASETS),
                   help="the mixture: grid (7x7, the paper's toy), d8, d32, widths (see above)")
    p.add_argument("--kl", action="store_true", help="also the per-step KL from the true posterior")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="quality-gmm")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    steps_list = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.variants.replace(";", " ").split() if n]
    variants = [Variant.parse(n) for n in names]
    mixture = DATASETS[args.data]()
    results, samples = {}, {}
    t_start = time.time()
    for steps in steps_list:
        for v in variants:
            key = f"{v.name}@{steps}"
            # a DDIM baseline shares the plain model's training: same seed, same weights
            for seed in seeds:
                r = run_one(v, steps, seed, args.iters, args.num, mixture, args.kl)
                results.setdefault(key, []).append(r["metrics"])
                if seed == seeds[0]:
                    samples[key] = r["samples"]
                m = r["metrics"]
                print(f"[{time.time() - t_start:6.0f}s] T={steps:<5d} {v.name:<40s} seed={seed} "
                      f"hq={100 * m['high_quality']:5.1f}% modes={m['modes_covered']:2d} mmd={m['mmd']:.4f} "
                      f"nll={m['nll']:.2f}" + (f" kl={m['kl']:.2f}" if "kl" in m else ""), flush=True)
    md = table(results, names, steps_list)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    (out / f"{args.tag}.md").write_text(
        f"<!-- {cmd} -->\n\nData {args.data}; seeds {seeds}, {args.iters} training iterations (batch 256), {args.num} samples; "
        f"mean ± std over seeds.\n\n{md}")
    (out / f"{args.tag}.json").write_text(json.dumps({"command": cmd, "seeds": seeds, "iters": args.iters,
                                                     "results": results}, indent=1) + "\n")
    if not args.no_plot and mixture.means.shape[1] == 2:  # no picture of 8-D or 32-D samples
        data = mixture.sample(args.num, torch.Generator().manual_seed(0))
        plot(samples, names, steps_list, data, out / f"{args.tag}.png")
    print(f"wrote {out / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
