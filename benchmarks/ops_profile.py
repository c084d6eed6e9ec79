"""Where the time of each fused op's forward+backward goes: GPU kernels or the host.

``benchmarks/ops.py`` times whole calls, synchronised, as a user sees them. When such a call
takes longer than its kernels, the rest is the host: Python, the dispatcher, autograd. This
script separates the two for the issue-2 sizes (B = 128, C = 128, 32 x 32; D = 100, L = 2;
M = 4), on the GPU:

- wall: milliseconds per call, ``calls`` calls back to back between two synchronisations;
- kernels: the summed duration of the CUDA kernels (and memsets) one call launches, from
  ``torch.profiler``, with each kernel's share;
- host: milliseconds per call of the host's own work, measured as the wall time of the
  same calls on tiny inputs (where every kernel is instant).

A call whose wall time is close to its kernels' is bound by the GPU; one whose wall time is
close to the host's is bound by the host.

    python benchmarks/ops_profile.py --out ops-profile.md
    python benchmarks/ops_profile.py --host-only     # any machine: the host column alone, on CPU
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from softmix import ops


def inputs(op: str, device, batch: int, channels: int, size: int, dim: int, layers: int, samples: int):
    """The op's fwd+bwd as a closure over fresh inputs of the given sizes."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    image = (batch, channels, size, size)
    if op == "latent_transform":
        n = batch * size * size
        r, v, gy = randn(n, dim, grad=True), randn(layers, n, dim, grad=True), randn(n, dim)
        s = randn(layers, grad=True)
        return lambda: torch.autograd.grad(ops.latent_transform(r, v, s), (r, v, s), gy)
    if op == "mc_loss":
        target, pred = randn(*image), randn(samples, *image, grad=True)
        weight, gl = torch.rand(batch, generator=gen).to(device) + 0.5, torch.ones(batch, device=device)
        return lambda: torch.autograd.grad(ops.mc_loss(pred, target, weight, "jensen"), (pred,), gl)
    if op == "denoise_step":
        x, m = randn(*image, grad=True), randn(*image, grad=True)
        noise, g_prev, g_x0 = randn(*image), randn(*image), randn(*image)
        a_t = torch.full((batch,), 0.5, device=device)
        a_prev = torch.full((batch,), 0.52, device=device)

        def call():
            out = ops.denoise_step(x, m, a_t, a_prev, noise, 1.0, "epsilon", 1.0)
            return torch.autograd.grad(out, (x, m), (g_prev, g_x0))
        return call
    raise ValueError(f"unknown op {op!r}")


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device, calls: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def kernel_ms(fn, calls: int) -> dict[str, float]:
    """Milliseconds per call of each kernel name, from the profiler's device events."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / 1e3 / calls
    return dict(per_kernel)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="latent_transform,mc_loss,denoise_step")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    p.add_argument("--host-only", action="store_true",
                   help="only the host's time per call (tiny inputs, one torch thread), on the CPU")
    args = p.parse_args()
    if args.host_only:
        torch.set_num_threads(1)
        cpu = torch.device("cpu")
        rows = [f"| {op} | {wall_ms(inputs(op, cpu, 2, 1, 2, 4, 2, 4), cpu, args.calls) * 1e3:.1f} |"
                for op in args.ops.split(",")]
        text = "\n".join(["| op | host, tiny inputs on CPU (us/call) |", "|---|---:|", *rows]) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return
    if not torch.cuda.is_available():
        raise SystemExit("ops_profile.py needs a CUDA device (or --host-only)")
    device = torch.device("cuda")
    lines = [f"# Fused ops, forward+backward: kernels against host ({torch.cuda.get_device_name(device)})", "",
             "| op | wall (ms/call) | kernels (ms/call) | host, tiny inputs (ms/call) |", "|---|---:|---:|---:|"]
    details = []
    for op in args.ops.split(","):
        full = inputs(op, device, 128, 128, 32, 100, 2, 4)
        tiny = inputs(op, device, 2, 1, 2, 4, 2, 4)
        kernels = kernel_ms(full, args.calls)
        lines.append(f"| {op} | {wall_ms(full, device, args.calls):.3f} | {sum(kernels.values()):.3f} | "
                     f"{wall_ms(tiny, device, args.calls):.3f} |")
        details += ["", f"{op}: kernels per call", "", "| kernel | ms |", "|---|---:|"]
        details += [f"| `{name[:90]}` | {ms:.4f} |" for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])]
    text = "\n".join(lines + details) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
