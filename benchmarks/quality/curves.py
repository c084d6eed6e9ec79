"""Learning curves of ``digits.py --eval-at`` runs, merged: FD against training steps for each
variant, over all the given runs (one run per seed or per variant is how two cores are kept
busy), and each variant's FD over a reference variant's, seed by seed.

    python benchmarks/quality/curves.py benchmarks/results/quality-digits-curve-*-T10-s*.json \
        --reference plain --tag quality-digits-curve-T10

Prints a table (mean ± std over seeds, the per-seed values, the mean per-seed ratio to the
reference over the seeds both ran, and the ratio of the mean FDs over all seeds) and writes
``<out>/<tag>.md`` and ``<out>/<tag>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, markdown_table, mean_spread  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def curves_from_results(results: dict, seeds: list[int], curves: dict | None = None, source: str = "") -> dict:
    """Add digits.py's ``results`` (``{"variant@T@iters": [metrics per seed]}``, seeds in the
    order of ``seeds``) to ``curves``, ``{(variant, T): {iters: {seed: fd}}}``, and return it."""
    curves = curves if curves is not None else defaultdict(lambda: defaultdict(dict))
    for key, per_seed in results.items():
        parts = key.split("@")
        if len(parts) != 3:
            raise ValueError(f"{source}: {key!r} is not from a run with --eval-at (expected variant@T@iters)")
        name, steps, iters = parts[0], int(parts[1]), int(parts[2])
        for seed, m in zip(seeds, per_seed):
            if seed in curves[(name, steps)][iters]:
                raise ValueError(f"{source}: {name} T={steps} seed {seed} at {iters} steps is in two files")
            curves[(name, steps)][iters][seed] = m["fd"]
    return curves


def _seeds_from_command(command: str, path: str) -> list[int]:
    """The ``--seeds`` of a result file written before digits.py stored them."""
    words = command.split()
    if "--seeds" not in words:
        raise ValueError(f"{path}: no 'seeds' entry and no --seeds in its command {command!r}")
    return [int(s) for s in words[words.index("--seeds") + 1].split(",")]


def load_curves(paths: list[str]) -> tuple[dict, list[str]]:
    """``{(variant, T): {iters: {seed: fd}}}`` from digits.py JSON files, and their commands."""
    curves: dict = defaultdict(lambda: defaultdict(dict))
    commands = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        commands.append(run["command"])
        seeds = run.get("seeds") or _seeds_from_command(run["command"], path)
        curves_from_results(run["results"], seeds, curves, source=path)
    return curves, commands


def legend_label(name: str) -> str:
    """``plain:hidden=64,pred=sample`` -> ``plain:hidden=64``; the keys that every digits curve
    shares (``pred``, ``bound``) left out, ``cat=K`` said as ``categorical``, any other key kept."""
    first, *keys = name.split(",")
    shown = ["categorical" if k.startswith("cat=") else k for k in keys if not k.startswith(("pred=", "bound="))]
    return ", ".join([first, *shown])


def plot_curves(curves: dict, path: Path, hlines: list[tuple[str, float]] = ()) -> None:
    """FD against training steps, one panel per T, one line (the mean over seeds, each seed a
    dot) per variant; ``hlines``: ``(label, FD)`` reference lines, dashed."""
    from softmix.plots import _pyplot

    plt = _pyplot()
    all_steps = sorted({steps for _, steps in curves})
    fig, axes = plt.subplots(1, len(all_steps), figsize=(4.8 * len(all_steps), 3.6), squeeze=False)
    for ax, steps in zip(axes[0], all_steps):
        for (name, s), by_iters in sorted(curves.items()):
            if s != steps:
                continue
            iters = sorted(by_iters)
            means = [sum(by_iters[i].values()) / len(by_iters[i]) for i in iters]
            line, = ax.plot(iters, means, marker="o", label=legend_label(name))
            for i in iters:
                ax.scatter([i] * len(by_iters[i]), list(by_iters[i].values()), s=10, color=line.get_color(), alpha=0.5)
        ax.set(xscale="log", yscale="log", xlabel="training steps", ylabel="FD (classifier features)",
               title=f"digits, T = {steps}")
        ticks = sorted({i for (_, s), by_iters in curves.items() if s == steps for i in by_iters})
        ax.set_xticks(ticks, [f"{i / 1000:g}k" if i >= 1000 else str(i) for i in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        for label, value in hlines:  # after the scales are set, so the label sits at the left edge
            ax.axhline(value, linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(label, (ax.get_xlim()[0], value), fontsize=7, va="bottom", color="grey")
        low, high = ax.get_ylim()  # FD ticks as plain numbers, not powers of ten
        fd_ticks = [y for y in (2, 3, 5, 10, 20, 30, 50, 100, 200) if low <= y <= high]
        ax.set_yticks(fd_ticks, [f"{y:g}" for y in fd_ticks])
        ax.yaxis.set_minor_locator(plt.NullLocator())
        # below the panel: the variants' names are long, and inside it they hid the reference lines
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.18))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="digits.py result files (runs with --eval-at)")
    p.add_argument("--reference", default="plain", help="the variant the others are divided by (its name's start)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="quality-digits-curve")
    p.add_argument("--hline", action="append", default=[], metavar="LABEL=FD",
                   help="a dashed reference line in the plot (e.g. an oracle's FD); repeatable")
    args = p.parse_args(argv)
    hlines = []
    for text in args.hline:
        label, _, value = text.rpartition("=")
        try:
            hlines.append((label, float(value)))
        except ValueError:
            p.error(f"--hline takes LABEL=FD, got {text!r}")
    curves, commands = load_curves(args.json)
    references = {}
    for name, steps in sorted(curves):
        if name.startswith(args.reference):
            if steps in references:
                p.error(f"--reference {args.reference!r} matches two variants at T={steps}: "
                        f"{references[steps]!r} and {name!r}; give more of the name")
            references[steps] = name
    rows = []
    for (name, steps), by_iters in sorted(curves.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ref = curves.get((references.get(steps), steps), {})
        for iters, by_seed in sorted(by_iters.items()):
            seeds = sorted(by_seed)
            ref_fds = ref.get(iters, {})
            paired, of_means = "", ""
            if ref_fds and references.get(steps) != name:
                # a seed without a reference run has no per-seed ratio: say how many pair, and
                # count every seed in the ratio of the means
                ratios = [by_seed[s] / ref_fds[s] for s in seeds if s in ref_fds]
                if ratios:
                    paired = fmt(ratios, 2) + ("" if len(ratios) == len(seeds)
                                               else f" ({len(ratios)} of {len(seeds)} seeds)")
                of_means = f"{mean_spread(list(by_seed.values()))[0] / mean_spread(list(ref_fds.values()))[0]:.2f}"
            rows.append([str(steps), f"`{name}`", str(iters), fmt([by_seed[s] for s in seeds], 2),
                         ", ".join(f"{by_seed[s]:.2f}" for s in seeds), paired, of_means])
    md = markdown_table(["T", "variant", "iters", "FD", "per seed", f"FD / {args.reference}'s, per seed",
                         "mean FD / its mean FD, all seeds"], rows)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text("Merged by `benchmarks/quality/curves.py` from:\n\n"
                                        + "".join(f"    {c}\n" for c in commands) + "\n" + md)
    plot_curves(curves, out / f"{args.tag}.png", hlines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
