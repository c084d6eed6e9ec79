"""Time and peak memory of one training step: plain vs SMD vs a paper-code-style head.

Same backbone for every row (softmix's built-in ConvDenoiser by default; a diffusers
UNet2DModel with --backbone unet). Rows:

- plain: the ordinary DDPM loss;
- SMD, output injection, M = 1, 4, 8 (the backbone runs once, the head M times);
- SMD, input + output injection, M = 4 (the M samples batched through the backbone);
- paper-style head, output injection, M = 4: the same head with every ``v v^T + s I`` formed
  as a dense D x D matrix per position (``softmix.reference.latent_transform_materialized``).

    python benchmarks/train_step.py                    # CPU, small settings
    python benchmarks/train_step.py --device cuda --batch 128 --size 32 --backbone unet --write

Peak memory: CUDA's max_memory_allocated on GPUs; on CPUs the peak resident set size of a
fresh subprocess per row (ru_maxrss), minus the process's RSS before the step.
"""

from __future__ import annotations

import argparse
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
    ("SMD input+output, M=4", dict(smd=True, inject="auto", m=4)),
    ("paper-style head (D x D), output, M=4", dict(smd=True, inject="output", m=4, materialized=True)),
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
    model = softmix.SMD(backbone, latent_dim=args.latent_dim, hyper_layers=args.hyper_layers, inject=row["inject"])
    if row.get("materialized"):
        import softmix.head as head_mod
        from softmix import reference

        class _Materialized:  # the paper's formulation in place of the fused op
            latent_transform = staticmethod(reference.latent_transform_materialized)

        head_mod.ops = _Materialized
    return model


def time_row(args, row) -> dict:
    import resource

    import softmix

    device = torch.device(args.device)
    model = build(args, row).to(device)
    schedule = softmix.NoiseSchedule(1000)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.randn(args.batch, args.channels, args.size, args.size, device=device)

    def step():
        loss = softmix.training_loss(model, schedule, x0, num_samples=row.get("m", 1), bound="logmeanexp")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    times.sort()
    return {"ms": 1000 * times[0],  # best of N: the machine is shared, noise only adds
            "peak_mib": peak, "rss_before_mib": rss_before / 1024,
            "params": sum(p.numel() for p in model.parameters())}


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
        print(json.dumps(time_row(args, ROWS[args._row][1])))
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
    plain = results[0][1]
    lines = ["| configuration | step (ms, best of N) | x plain | peak memory (MiB) | x plain | parameters |",
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
                f"logmeanexp bound; Adam step included\n"
                f"- peak memory: {'CUDA max_memory_allocated' if dev.startswith('cuda') else 'peak RSS of a fresh process per row (includes the Python/torch baseline)'}\n\n"
                f"{table}\n")
        path = Path(__file__).parent / "results" / f"train_step-{'cuda' if dev.startswith('cuda') else 'cpu'}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
