"""Time and peak memory of one training step: plain vs SMD vs a paper-code-style head.

Same backbone for every row (softmix's built-in ConvDenoiser by default; a diffusers
UNet2DModel with --backbone unet). Rows:

- plain: the ordinary DDPM loss;
- SMD, output injection, M = 1, 4, 8, 16 (the backbone runs once, the head M times, with
  ``W_out`` folded into the last layer: ``SMDHead.through_layer``), and M = 16 unfolded (the
  head's output of C channels through the last layer for each sample, as before 2026-11-29);
- SMD, input + output injection, M = 4 (the M samples batched through the backbone);
- paper-style head, output injection, M = 4: the same head with every ``v v^T + s I`` formed
  as a dense D x D matrix per position (``softmix.reference.latent_transform_materialized``),
  unfolded;
- the categorical identifier, K = 64 components, output injection, predicting ``x0``: folded
  (one conv with K extra output channels, ``SMDHead.through_layer_shared``) and unfolded.

    python benchmarks/train_step.py                    # CPU, small settings
    python benchmarks/train_step.py --device cuda --batch 128 --size 32 --backbone unet --write

Time: the best of ``--iters`` steps, the rows taking turns in one process. Peak memory, in a
fresh subprocess per row: CUDA's max_memory_allocated on GPUs; on CPUs the peak resident set
size (ru_maxrss, which includes the Python/torch baseline of the process).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS = [
    ("plain", dict(smd=False)),
    ("SMD output, M=1", dict(smd=True, inject="output", m=1)),
    ("SMD output, M=4", dict(smd=True, inject="output", m=4)),
    ("SMD output, M=8", dict(smd=True, inject="output", m=8)),
    ("SMD output, M=16", dict(smd=True, inject="output", m=16)),
    ("SMD output, M=16, not folded", dict(smd=True, inject="output", m=16, fold=False)),
    ("SMD input+output, M=4", dict(smd=True, inject="auto", m=4)),
    ("paper-style head (D x D), output, M=4", dict(smd=True, inject="output", m=4, materialized=True, fold=False)),
    ("categorical K=64, output", dict(smd=True, inject="output", categorical=64)),
    ("categorical K=64, output, not folded", dict(smd=True, inject="output", categorical=64, fold=False)),
]


def build(args, row):
    import softmix
    from softmix.nets import ConvDenoiser

    torch.manual_seed(0)
    if args.backbone == "unet":
        from diffusers import UNet2DModel

        backbone = UNet2DModel(sample_size=args.size, in_channels=args.channels, out_channels=args.channels,
                               block_out_channels=(args.hidden, 2 * args.hidden), layers_per_block=1,
                               norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D"))
    else:
        backbone = ConvDenoiser(args.channels, hidden=args.hidden, blocks=args.blocks)
    if not row["smd"]:
        return backbone
    if row.get("categorical"):
        return softmix.SMD(backbone, latent_dim=args.latent_dim, hyper_layers=args.hyper_layers, inject=row["inject"],
                           identifier="categorical", num_components=row["categorical"])
    return softmix.SMD(backbone, latent_dim=args.latent_dim, hyper_layers=args.hyper_layers, inject=row["inject"])


@contextlib.contextmanager
def head_ops(row):
    """For the paper-style row, the head's fused op replaced by the materialised D x D form;
    for the rows that say so, the head not folded into the last layer."""
    import softmix.head as head_mod
    from softmix import reference

    class _Materialized:
        latent_transform = staticmethod(reference.latent_transform_materialized)

    fused, folds_into = head_mod.ops, head_mod.SMDHead.folds_into
    if row.get("materialized"):
        head_mod.ops = _Materialized
    if row.get("fold") is False:
        head_mod.SMDHead.folds_into = lambda self, layer: False
    try:
        yield
    finally:
        head_mod.ops, head_mod.SMDHead.folds_into = fused, folds_into


def make_step(args, row):
    """``(step, parameters)``: ``step()`` runs one training step (Adam included) of the row."""
    import softmix

    device = torch.device(args.device)
    model = build(args, row).to(device)
    schedule = softmix.NoiseSchedule(1000)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.randn(args.batch, args.channels, args.size, args.size, device=device)

    def step():
        with head_ops(row):
            if row.get("categorical"):  # enumerates its K components; x0, as it needs (quality.md)
                loss = softmix.training_loss(model, schedule, x0, prediction_type="sample")
            else:
                loss = softmix.training_loss(model, schedule, x0, num_samples=row.get("m", 1))  # the default bound
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, sum(p.numel() for p in model.parameters())


def time_rows(args) -> list[float]:
    """Best step time (ms) of each row, the rows taking turns step by step in one process, so
    that a slow spell of a shared machine falls on every row alike."""
    steps = [make_step(args, row)[0] for _, row in ROWS]
    for step in steps:
        for _ in range(args.warmup):
            step()
    best = [float("inf")] * len(steps)
    print(f"timing {len(steps)} rows, {args.iters} steps each", file=sys.stderr)
    for _ in range(args.iters):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            best[i] = min(best[i], 1000 * (time.perf_counter() - start))
    return best


def memory_row(args, row) -> dict:
    """Peak memory of the row's step, in a fresh process (see the module docstring)."""
    import resource

    device = torch.device(args.device)
    step, params = make_step(args, row)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    return {"peak_mib": peak, "params": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", choices=("conv", "unet"), default="conv")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--hyper-layers", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/train_step-<device>.md")
    p.add_argument("--_row", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args._row is not None:  # child process: one row, fresh memory accounting
        print(json.dumps(memory_row(args, ROWS[args._row][1])))
        return

    results = []
    for i, (name, _) in enumerate(ROWS):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_row", str(i)]
        cmd = [c for c in cmd if c != "--write"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            results.append((name, None))
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
        print(f"memory of {name}: {results[-1][1]['peak_mib']:.0f} MiB", file=sys.stderr)
    for (_, r), ms in zip(results, time_rows(args)):
        if r is not None:
            r["ms"] = ms
    plain = results[0][1]
    lines = ["| configuration | step (ms, best of N, rows interleaved) | x plain | peak memory (MiB) | x plain | parameters |",
             "|---|---|---|---|---|---|"]
    for name, r in results:
        if r is None:
            lines.append(f"| {name} | failed | | | | |")
            continue
        lines.append(f"| {name} | {r['ms']:.1f} | {r['ms'] / plain['ms']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] / plain['peak_mib']:.2f} | {r['params']:,} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        from softmix.loss import DEFAULT_BOUND, DEFAULT_CATEGORICAL_BOUND

        dev = args.device
        if dev.startswith("cuda"):
            machine = torch.cuda.get_device_name()
        else:
            machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
        command = "python benchmarks/train_step.py " + " ".join(a for a in sys.argv[1:])
        text = (f"# One training step: plain vs SMD vs the paper-code head\n\n"
                f"- machine: {machine}\n- date: {datetime.date.today().isoformat()}\n"
                f"- command: `{command}`\n"
                f"- backbone: {args.backbone}, batch {args.batch}, {args.channels}x{args.size}x{args.size}, "
                f"width {args.hidden}; SMD latent D = {args.latent_dim}, L = {args.hyper_layers}; "
                f"the library's default bounds ({DEFAULT_BOUND!r}; {DEFAULT_CATEGORICAL_BOUND!r} for the "
                f"categorical rows); Adam step included\n"
                f"- peak memory: {'CUDA max_memory_allocated' if dev.startswith('cuda') else 'peak RSS of a fresh process per row (includes the Python/torch baseline)'}\n\n"
                f"{table}\n")
        backbone = "" if args.backbone == "conv" else f"-{args.backbone}"
        path = Path(__file__).parent / "results" / f"train_step-{'cuda' if dev.startswith('cuda') else 'cpu'}{backbone}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
