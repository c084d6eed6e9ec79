"""Benchmark softmix's three fused operators against the baselines a user would otherwise use.

    python benchmarks/ops.py [--device cpu|cuda] [--quick] [--out benchmarks/results/ops-cpu.md]

For each operator (forward + backward, and forward alone where sampling only needs that) it
times and measures the peak memory of

- the fused op (``softmix.ops.*``),
- the eager PyTorch reference (``softmix.reference.*``),
- ``torch.compile`` of that reference,
- for ``latent_transform``: the dense ``D x D`` form of the paper's code
  (``softmix.reference.latent_transform_materialized``),
- for ``denoise_step``: diffusers' ``DDPMScheduler.step`` (forward only),

and reports the achieved bandwidth (the bytes the op must at least move, ``min_bytes`` below,
divided by the time) against the copy bandwidth of the same machine measured in the same
run, the speedups that issue 2 sets as goals, and whether each goal is met. The table is
printed and, with ``--out``, written as markdown.

Timing: median over repeats, after warm-up (which also compiles the ``torch.compile``
variants), with ``torch.cuda.synchronize()`` around every repeat on CUDA. Peak memory: the
most bytes held by tensors allocated during one call above what was live before it, so the
inputs are excluded and outputs, saved activations, temporaries and gradients are included.
On CUDA this is ``torch.cuda.max_memory_allocated()`` after a reset; on CPU it is computed
from the allocation and free events of torch's CPU allocator recorded by
``torch.profiler`` (``profile_memory=True``): the running sum of allocated minus freed bytes,
at its maximum. (Process RSS is not used: the C allocator keeps freed pages, so RSS tracks
the history of the process rather than the op.)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import softmix
from softmix import ops, reference

MiB = 1024**2
GB = 1e9


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """The problem: B images of H x W positions.

    ``latent_transform`` runs on ``N = B * H * W`` positions of a ``D``-dimensional latent
    with ``L`` layers; ``mc_loss`` and ``denoise_step`` on ``(B, C, H, W)`` tensors (a
    feature/latent map of C channels, so the tensors are large enough to measure
    bandwidth), with ``M`` Monte Carlo samples for the loss.
    """

    batch: int
    height: int
    width: int
    channels: int
    latent_dim: int
    layers: int
    samples: int

    @property
    def positions(self) -> int:
        return self.batch * self.height * self.width

    @property
    def image(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def image_numel(self) -> int:
        return math.prod(self.image)

    def describe(self) -> str:
        return (
            f"B={self.batch}, {self.height}x{self.width} positions, C={self.channels}, "
            f"D={self.latent_dim}, L={self.layers}, M={self.samples}"
        )


# Issue 2 asks for B = 128 (or as fits), 32x32 positions, C = 128, D = 100, L = 2, M = 4.
# On a 2-core CPU, B = 32 keeps the whole run (the materialised D x D baseline above all)
# to a few minutes; a GPU takes the full B = 128.
FULL_CPU = Sizes(batch=32, height=32, width=32, channels=128, latent_dim=100, layers=2, samples=4)
FULL_CUDA = Sizes(batch=128, height=32, width=32, channels=128, latent_dim=100, layers=2, samples=4)
QUICK = Sizes(batch=2, height=8, width=8, channels=8, latent_dim=16, layers=2, samples=2)


# --------------------------------------------------------------------------------------
# The bytes each op must at least move
# --------------------------------------------------------------------------------------


def min_bytes(op: str, pass_: str, z: Sizes, elt: int) -> int:
    """Bytes an ideal kernel must read plus write for ``op``; ``pass_`` is "fwd" or "fwd+bwd".

    Each input is read once and each output written once; small per-row vectors (``s``,
    ``weight``, the alphas, the per-example loss) are left out. The backward recomputes what
    it needs from the inputs rather than storing intermediates, as the fused ops do, and
    writes only the gradients the benchmark asks for.

    latent_transform, ``r (N, D)``, ``v (L, N, D)``, gradients for ``r`` and ``v`` (and ``s``):
        fwd: read r, v; write y                                     -> 2 ND + LND
        bwd: read grad_y, r, v; write grad_r, grad_v                -> 3 ND + 2 LND
    mc_loss, ``pred (M, B, *S)`` (P elements), ``target (B, *S)`` (T elements); gradient for
    ``pred`` only (the target is the noise, which needs none; the ``(M, B)`` log-weights and
    their gradient are per-row vectors):
        fwd: read pred, target                                      -> P + T
        bwd: read pred, target; write grad_pred                     -> 2 P + T
    denoise_step, ``x_t``, ``model_output``, ``noise`` of X elements each; gradients for
    ``x_t`` and ``model_output``:
        fwd: read x_t, model_output, noise; write x_prev, x0         -> 5 X
        bwd: read grad_x_prev, grad_x0, x_t, model_output (the clip
             mask); write grad_x_t, grad_model_output                -> 6 X
    """
    if op == "latent_transform":
        nd = z.positions * z.latent_dim
        lnd = z.layers * nd
        fwd, bwd = 2 * nd + lnd, 3 * nd + 2 * lnd
    elif op.startswith("mc_loss"):
        p = z.samples * z.image_numel
        t = z.image_numel
        fwd, bwd = p + t, 2 * p + t
    elif op == "denoise_step":
        x = z.image_numel
        fwd, bwd = 5 * x, 6 * x
    else:
        raise ValueError(op)
    return elt * (fwd if pass_ == "fwd" else fwd + bwd)


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int, min_repeat_s: float,
              budget_s: float) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` repeats, after ``warmup`` calls.

    A repeat runs ``fn`` enough times to last ``min_repeat_s``; slow variants get fewer
    repeats (at least 3) so that one variant stays within about ``budget_s``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(min_repeat_s / once))
    repeats = max(3, min(repeats, int(budget_s / (once * inner))))
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Most bytes held by tensors allocated during one call of ``fn`` (inputs excluded)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def copy_bandwidth(device: torch.device, numel: int, args) -> float:
    """Bytes per second of ``dst.copy_(src)`` on float32 tensors: 2 * size bytes per copy."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, warmup=3, repeats=max(args.repeats, 11),
                        min_repeat_s=args.min_repeat_s, budget_s=args.budget_s)
    del src, dst
    return 2 * numel * 4 / seconds


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    variant: str
    pass_: str
    seconds: float | None
    peak: int | None
    nbytes: int
    note: str = ""
    fused: bool = False
    baseline: str = "fused (softmix.ops)"  # the fused variant this row is compared with

    @property
    def gbps(self) -> float | None:
        return None if self.seconds is None else self.nbytes / self.seconds / GB


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def find(self, op: str, variant: str, pass_: str) -> Row | None:
        for row in self.rows:
            if row.op == op and row.variant == variant and row.pass_ == pass_:
                return row
        return None

    def fused_for(self, row: Row) -> Row | None:
        """The fused row that ``row`` is compared with: same op and pass."""
        return self.find(row.op, row.baseline, row.pass_)


@dataclass
class Variant:
    name: str
    pass_: str
    fn: Callable[[], object]
    fused: bool = False
    note: str = ""
    scale: float = 1.0  # time and memory are multiplied by this (a variant run on fewer positions)
    baseline: str = "fused (softmix.ops)"


def run_variants(op: str, variants: list[Variant], z: Sizes, elt: int, device: torch.device, args,
                 results: Results) -> None:
    for var in variants:
        label = f"{op} / {var.name} / {var.pass_}"
        print(f"  {label} ...", end="", flush=True, file=sys.stderr)
        try:
            seconds = time_call(var.fn, device, warmup=args.warmup, repeats=args.repeats,
                                min_repeat_s=args.min_repeat_s, budget_s=args.budget_s)
            peak = peak_memory(var.fn, device)
            seconds, peak = seconds * var.scale, int(peak * var.scale)
            note = var.note
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            seconds, peak = None, None
            note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        print(f" {'-' if seconds is None else f'{seconds * 1e3:.3f} ms'}", file=sys.stderr)
        results.rows.append(Row(op, var.name, var.pass_, seconds, peak, min_bytes(op, var.pass_, z, elt), note,
                                var.fused, var.baseline))


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grads(outputs, inputs, grad_outputs):
    """The gradients of ``outputs`` for ``inputs``, without accumulating into ``.grad``."""
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def compile_fn(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------------------
# The three ops
# --------------------------------------------------------------------------------------


def bench_latent_transform(z: Sizes, dtype, device, args, results: Results) -> None:
    op = "latent_transform"
    n, d, layers = z.positions, z.latent_dim, z.layers
    gen = torch.Generator(device="cpu").manual_seed(0)

    def inputs(positions: int):
        r = torch.randn(positions, d, generator=gen).to(device, dtype).requires_grad_()
        # |v| ~ 1 keeps y bounded over the layers, as the head's normalised latents do.
        v = (torch.randn(layers, positions, d, generator=gen) / math.sqrt(d)).to(device, dtype).requires_grad_()
        s = torch.nn.functional.softplus(torch.randn(layers, generator=gen)).to(device, dtype).requires_grad_()
        gy = torch.randn(positions, d, generator=gen).to(device, dtype)
        return r, v, s, gy

    r, v, s, gy = inputs(n)

    def fwd_bwd(f, r=r, v=v, s=s, gy=gy):
        return lambda: grads(f(r, v, s), (r, v, s), gy)

    def fwd(f):
        def call():
            with torch.no_grad():
                return f(r, v, s)
        return call

    results.checks.append(
        f"{op}: fused vs eager reference, max |diff| / max |ref|: "
        f"y {max_rel_diff(ops.latent_transform(r, v, s), reference.latent_transform(r, v, s)):.1e}, "
        + ", ".join(
            f"grad_{name} {max_rel_diff(a, b):.1e}"
            for name, a, b in zip("rvs", grads(ops.latent_transform(r, v, s), (r, v, s), gy),
                                  grads(reference.latent_transform(r, v, s), (r, v, s), gy))
        )
    )

    variants = [
        Variant("fused (softmix.ops)", "fwd+bwd", fwd_bwd(ops.latent_transform), fused=True),
        Variant("eager reference (factored)", "fwd+bwd", fwd_bwd(reference.latent_transform)),
    ]
    if args.compile:
        variants.append(Variant("torch.compile(reference)", "fwd+bwd", fwd_bwd(compile_fn(reference.latent_transform))))

    # The materialised D x D form: estimate its memory from a small probe and run it on as
    # many positions as fit in half the free memory, scaling time and memory up linearly
    # (both are linear in the number of positions).
    probe = min(n, 1024)
    pr, pv, ps, pgy = inputs(probe)
    per_position = peak_memory(fwd_bwd(reference.latent_transform_materialized, pr, pv, ps, pgy), device) / probe
    del pr, pv, ps, pgy
    budget = 0.5 * available_memory(device)
    run_n = n
    while run_n > probe and per_position * run_n > budget:
        run_n //= 2
    note = f"needs ~{per_position * n / 2**30:.1f} GiB"
    if run_n < n:
        mr, mv, ms, mgy = inputs(run_n)
        note += (f" > half the free memory ({budget / 2**30:.1f} GiB): run on {run_n} of {n} positions, "
                 f"time and memory scaled x{n / run_n:g}")
        mat = Variant("materialised D x D (paper's code)", "fwd+bwd",
                      fwd_bwd(reference.latent_transform_materialized, mr, mv, ms, mgy), note=note, scale=n / run_n)
    else:
        mat = Variant("materialised D x D (paper's code)", "fwd+bwd",
                      fwd_bwd(reference.latent_transform_materialized), note=note)
    variants.append(mat)

    variants += [
        Variant("fused (softmix.ops)", "fwd", fwd(ops.latent_transform), fused=True),
        Variant("eager reference (factored)", "fwd", fwd(reference.latent_transform)),
    ]
    run_variants(op, variants, z, torch.finfo(dtype).bits // 8, device, args, results)


def bench_mc_loss(z: Sizes, dtype, device, args, results: Results, bound: str, log_weights: bool = False) -> None:
    """The loss over M samples; with ``log_weights``, over a finite mixture of M weighted
    components (a categorical identifier's bound), differentiated in pred and the log-weights."""
    op = f"mc_loss ({bound}, log_weights)" if log_weights else f"mc_loss ({bound})"
    gen = torch.Generator(device="cpu").manual_seed(1)
    loss_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    target_cpu = torch.randn(*z.image, generator=gen)  # drawn on the CPU: the same values on every device
    target = target_cpu.to(device, dtype)
    pred = (target_cpu + 0.3 * torch.randn(z.samples, *z.image, generator=gen)).to(device, dtype).requires_grad_()
    weight = torch.rand(z.batch, generator=gen).add(0.5).to(device, dtype)
    gl = torch.ones(z.batch, device=device, dtype=loss_dtype)
    kw, wrt = {}, (pred,)
    if log_weights:
        lw = torch.log_softmax(torch.randn(z.samples, z.batch, generator=gen), 0).to(device, loss_dtype)
        kw, wrt = {"log_weights": lw.requires_grad_()}, (pred, lw)

    def ref(p, t, w):
        return reference.mc_loss(p, t, w, bound, **kw)

    def fused(p, t, w):
        return ops.mc_loss(p, t, w, bound, **kw)

    def fwd(f):
        def call():
            with torch.no_grad():
                return f(pred, target, weight)
        return call

    ref_loss, fused_loss = ref(pred.float(), target.float(), weight.float()), fused(pred, target, weight)
    results.checks.append(
        f"{op}: fused vs eager reference, max |diff| / max |ref|: loss {max_rel_diff(fused_loss, ref_loss):.1e}, "
        + ", ".join(f"grad_{name} {max_rel_diff(a, b):.1e}"
                    for name, a, b in zip(("pred", "log_weights"), grads(fused_loss, wrt, gl),
                                          grads(ref_loss, wrt, gl.float())))
    )

    def ref_fwd_bwd():
        loss = ref(pred, target, weight)
        return grads(loss, wrt, gl.to(loss.dtype))

    compiled = compile_fn(ref) if args.compile else None

    def compiled_fwd_bwd():
        loss = compiled(pred, target, weight)
        return grads(loss, wrt, gl.to(loss.dtype))

    # with log_weights the reference is the eager formula softmix.loss.categorical_bound had
    # before the fused op took log-weights
    ref_note = "the eager categorical_bound formula" if log_weights else ""
    variants = [
        Variant("fused (softmix.ops)", "fwd+bwd", lambda: grads(fused(pred, target, weight), wrt, gl), fused=True),
        Variant("eager reference", "fwd+bwd", ref_fwd_bwd, note=ref_note),
    ]
    if args.compile:
        variants.append(Variant("torch.compile(reference)", "fwd+bwd", compiled_fwd_bwd))
    variants += [
        Variant("fused (softmix.ops)", "fwd", fwd(fused), fused=True),
        Variant("eager reference", "fwd", fwd(ref), note=ref_note),
    ]
    run_variants(op, variants, z, torch.finfo(dtype).bits // 8, device, args, results)


def bench_denoise_step(z: Sizes, dtype, device, args, results: Results) -> None:
    op = "denoise_step"
    gen = torch.Generator(device="cpu").manual_seed(2)
    x_t = torch.randn(*z.image, generator=gen).to(device, dtype)
    model_output = torch.randn(*z.image, generator=gen).to(device, dtype)
    noise = torch.randn(*z.image, generator=gen).to(device, dtype)
    g_prev = torch.randn(*z.image, generator=gen).to(device, dtype)
    g_x0 = torch.randn(*z.image, generator=gen).to(device, dtype)
    x_t_g = x_t.clone().requires_grad_()
    mo_g = model_output.clone().requires_grad_()

    # diffusers' defaults for DDPM: linear betas, epsilon prediction, x0 clipped to [-1, 1],
    # "fixed_small" variance. It takes one scalar timestep for the whole batch, so all
    # samples sit at the same step here; the fused op gets that step's alphas as (B,) vectors.
    from diffusers import DDPMScheduler
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                              clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small")
    step = 500
    a_t = torch.full((z.batch,), scheduler.alphas_cumprod[step].item(), device=device, dtype=torch.float32)
    a_prev = torch.full((z.batch,), scheduler.alphas_cumprod[step - 1].item(), device=device, dtype=torch.float32)
    kw = dict(eta=1.0, prediction_type="epsilon", clip_sample=1.0)

    def fused(x, m, n):
        return ops.denoise_step(x, m, a_t, a_prev, n, **kw)

    def ref(x, m, n):
        return reference.denoise_step(x, m, a_t, a_prev, n, **kw)

    def fwd_bwd(f):
        return lambda: grads(f(x_t_g, mo_g, noise), (x_t_g, mo_g), (g_prev, g_x0))

    def fwd(f, n=noise):
        def call():
            with torch.no_grad():
                return f(x_t, model_output, n)
        return call

    def diffusers_step():
        return scheduler.step(model_output, step, x_t, return_dict=False)

    original_randn = ddpm_module.randn_tensor

    def diffusers_step_given_noise():
        # DDPMScheduler.step draws its noise itself; hand it ours so the two do the same work.
        ddpm_module.randn_tensor = lambda *a, **k: noise
        try:
            return scheduler.step(model_output, step, x_t, return_dict=False)
        finally:
            ddpm_module.randn_tensor = original_randn

    ref_out = ref(x_t, model_output, noise)
    fused_out = fused(x_t, model_output, noise)
    diff_out = diffusers_step_given_noise()
    results.checks.append(
        f"{op}: fused vs eager reference, max |diff| / max |ref|: x_prev {max_rel_diff(fused_out[0], ref_out[0]):.1e}, "
        f"x0 {max_rel_diff(fused_out[1], ref_out[1]):.1e}; fused vs diffusers DDPMScheduler.step (same noise): "
        f"x_prev {max_rel_diff(fused_out[0], diff_out[0]):.1e}, x0 {max_rel_diff(fused_out[1], diff_out[1]):.1e}; "
        + ", ".join(
            f"grad_{name} {max_rel_diff(a, b):.1e}"
            for name, a, b in zip(("x_t", "model_output"), fwd_bwd(fused)(), fwd_bwd(ref)())
        )
    )

    variants = [
        Variant("fused (softmix.ops)", "fwd+bwd", fwd_bwd(fused), fused=True),
        Variant("eager reference", "fwd+bwd", fwd_bwd(ref)),
    ]
    if args.compile:
        variants.append(Variant("torch.compile(reference)", "fwd+bwd", fwd_bwd(compile_fn(ref))))
    variants += [
        Variant("fused (softmix.ops)", "fwd", fwd(fused), fused=True, note="noise given"),
        Variant("fused, draws its noise (softmix.ops, noise=None)", "fwd",
                lambda: ops.denoise_step(x_t, model_output, a_t, a_prev, None, **kw), fused=True,
                note="the kernel draws the noise (Philox4x32-10 + Box-Muller, seeded from the default generator)"),
        Variant("fused, given torch.randn noise", "fwd",
                lambda: ops.denoise_step(x_t, model_output, a_t, a_prev,
                                         torch.randn(x_t.shape, dtype=x_t.dtype, device=x_t.device), **kw),
                baseline="fused, draws its noise (softmix.ops, noise=None)",
                note="torch.randn, then the fused op: the cost of a separate noise tensor"),
        Variant("eager reference", "fwd", fwd(ref)),
    ]
    if args.compile:
        variants.append(Variant("torch.compile(reference)", "fwd", fwd(compile_fn(ref))))
    variants += [
        Variant("diffusers DDPMScheduler.step", "fwd", diffusers_step,
                baseline="fused, draws its noise (softmix.ops, noise=None)",
                note="one timestep for the whole batch; draws its noise (randn_tensor); compared with the fused op "
                     "drawing its noise"),
        Variant("diffusers DDPMScheduler.step, noise given", "fwd", diffusers_step_given_noise,
                note="randn_tensor patched to return the same noise tensor"),
    ]
    run_variants(op, variants, z, torch.finfo(dtype).bits // 8, device, args, results)


# --------------------------------------------------------------------------------------
# Goals
# --------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def goals(results: Results, device: torch.device, copy_bw: float) -> list[tuple[str, float | None, float, str]]:
    """(goal, measured, threshold, unit) for the goals of issue 2 on this kind of device."""
    f = results.find
    fused, eager, compiled = "fused (softmix.ops)", "eager reference", "torch.compile(reference)"
    out: list[tuple[str, float | None, float, str]] = []

    def t(op, variant, pass_="fwd+bwd"):
        row = f(op, variant, pass_)
        return None if row is None else row.seconds

    def m(op, variant, pass_="fwd+bwd"):
        row = f(op, variant, pass_)
        return None if row is None else row.peak

    lt = "latent_transform"
    mat = "materialised D x D (paper's code)"
    if device.type == "cpu":
        out.append(("latent_transform fwd+bwd: fused vs materialised D x D, time", ratio(t(lt, mat), t(lt, fused)), 10, "x"))
        out.append(("latent_transform fwd+bwd: fused vs eager factored reference, time",
                    ratio(t(lt, "eager reference (factored)"), t(lt, fused)), 1.5, "x"))
        out.append(("mc_loss (jensen) fwd+bwd: fused vs eager reference, time",
                    ratio(t("mc_loss (jensen)", eager), t("mc_loss (jensen)", fused)), 1.5, "x"))
        out.append(("denoise_step fwd: fused (draws its noise) vs diffusers DDPMScheduler.step (draws its noise)",
                    ratio(t("denoise_step", "diffusers DDPMScheduler.step", "fwd"),
                          t("denoise_step", "fused, draws its noise (softmix.ops, noise=None)", "fwd")), 3, "x"))
        out.append(("denoise_step fwd: fused vs diffusers DDPMScheduler.step, both given the noise",
                    ratio(t("denoise_step", "diffusers DDPMScheduler.step, noise given", "fwd"),
                          t("denoise_step", fused, "fwd")), 3, "x"))
    else:
        for row in results.rows:
            if row.fused and row.pass_ == "fwd+bwd":
                out.append((f"{row.op} fwd+bwd: fused, share of copy bandwidth",
                            None if row.gbps is None else 100 * row.gbps * GB / copy_bw, 80, "%"))
        for row in results.rows:
            if row.fused and row.pass_ == "fwd+bwd":
                out.append((f"{row.op} fwd+bwd: fused vs torch.compile(reference), time",
                            ratio(t(row.op, compiled), row.seconds),
                            1.2, "x"))
        out.append(("latent_transform fwd+bwd: fused vs materialised D x D, time", ratio(t(lt, mat), t(lt, fused)), 50, "x"))
        out.append(("latent_transform fwd+bwd: fused vs materialised D x D, peak memory",
                    ratio(m(lt, mat), m(lt, fused)), 50, "x"))
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def other_load(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes, from /proc/stat over ``seconds`` while this one sleeps."""

    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def busy_compilers() -> list[str]:
    """Compiler processes running now (they would take cores from the timings)."""
    names = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if pid.isdigit():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm in ("cc1plus", "cc1", "nvcc", "cicc", "ptxas"):
                names.append(comm)
    return names


def git_commit() -> str:
    """The commit, with "-dirty" when the working tree differs from it (a copy of a working
    tree, as on a lent GPU machine, can carry an older .git than its files)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def fmt_ratio(value: float | None) -> str:
    """A speedup or memory ratio; huge ones (against a near-zero fused peak) are capped."""
    if value is None:
        return "-"
    return ">1000x" if value > 1000 else f"{value:.2f}x"


def report(results: Results, z: Sizes, dtype, device, copy_bw: float, copy_numel: int, args, busy: list[str],
           load: tuple[float | None, float | None]) -> str:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({cpu_model()})"
    lines = [
        f"# softmix fused operators: benchmark on {device.type.upper()}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"device: {device_name}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, softmix {softmix.__version__} "
        f"(git {git_commit()}), CUDA kernels built: {ops.cuda_kernels_built()}",
        f"- sizes: {z.describe()}, {str(dtype).replace('torch.', '')}. latent_transform: r (N, D), v (L, N, D) "
        f"with N = B*H*W = {z.positions}, s (L,). mc_loss: pred (M, B, C, H, W), target (B, C, H, W), gradient for "
        f"pred only (and for log_weights (M, B), a log-softmax of normal logits, in the log_weights rows). "
        f"denoise_step: (B, C, H, W) tensors, eta = 1 (DDPM), epsilon prediction, x0 clipped to "
        f"[-1, 1], gradients for x_t and model_output.",
        f"- copy bandwidth: {copy_bw / GB:.1f} GB/s (`dst.copy_(src)`, float32, {copy_numel * 4 / MiB:.0f} MiB, "
        f"bytes = 2 x size), measured in this run.",
        "- time: median of repeats after warm-up (warm-up includes torch.compile's compilation)"
        + ("; CUDA synchronised around each repeat." if device.type == "cuda" else "."),
        "- peak mem: most bytes held by tensors allocated during one call above what was live before it (inputs "
        "excluded; outputs, saved activations, temporaries and gradients included); "
        + ("`torch.cuda.max_memory_allocated` after a reset." if device.type == "cuda" else
           "from torch.profiler's CPU allocator events (`profile_memory=True`), the running sum of allocated "
           "minus freed bytes at its maximum."),
        "- GB/s: the bytes the op must at least read and write (`min_bytes` in benchmarks/ops.py: each input read "
        "once, each output written once, the backward recomputing from the inputs) divided by the time; the same "
        "count for every variant of an op, so it reads as effective bandwidth. % copy: that against the copy "
        "bandwidth.",
        "- fused faster / fused less mem: this variant's time (peak memory) divided by the fused op's, same op and "
        "pass.",
    ]
    if not args.compile:
        lines.append("- torch.compile variants skipped (--quick without --compile, or --no-compile).")
    lines.append(f"- other load: {fmt(load[0], '.2f')} (before) and {fmt(load[1], '.2f')} (after) of {os.cpu_count()} "
                 "cores busy with other processes, sampled for a second before and after the run (timings on a "
                 "shared machine are only as good as this is low).")
    if busy:
        lines.append(f"- WARNING: compiler processes were running when the benchmark started ({', '.join(sorted(set(busy)))}): "
                     "timings may be noisy.")
    lines += [
        "",
        "| op | variant | pass | time (ms) | peak mem (MiB) | GB/s | % copy | fused faster | fused less mem | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results.rows:
        base = results.fused_for(row)
        speed = ratio(row.seconds, base.seconds) if base is not None else None
        mem = ratio(row.peak, base.peak) if base is not None and base.peak else None
        lines.append(
            f"| {row.op} | {row.variant} | {row.pass_} | {fmt(None if row.seconds is None else row.seconds * 1e3, '.3f')} | "
            f"{fmt(None if row.peak is None else row.peak / MiB, '.2f')} | {fmt(row.gbps, '.1f')} | "
            f"{fmt(None if row.gbps is None else 100 * row.gbps * GB / copy_bw, '.0f')} | "
            f"{'' if row.fused else fmt_ratio(speed)} | {'' if row.fused else fmt_ratio(mem)} | {row.note} |"
        )
    lines += ["", f"## Goals of issue 2 ({'GPU' if device.type == 'cuda' else 'CPU'})", "",
              "| goal | measured | target | met |", "|---|---:|---:|---|"]
    for goal, value, threshold, unit in goals(results, device, copy_bw):
        met = "n/a" if value is None else ("yes" if value >= threshold else "**no**")
        shown = fmt(value, ".0f" if unit == "%" else ".2f") + (unit if value is not None else "")
        lines.append(f"| {goal} | {shown} | >= {threshold:g}{unit} | {met} |")
    if args.quick:
        lines += ["", "(--quick: tiny sizes, a smoke test; the numbers mean nothing.)"]
    lines += ["", "## Checks", ""] + [f"- {c}" for c in results.checks]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds: a smoke test")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--batch", type=int, help="override B")
    p.add_argument("--ops", default="latent_transform,mc_loss,denoise_step",
                   help="comma-separated subset of latent_transform,mc_loss,denoise_step")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile of the references (default: on, off with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="on a shared machine, wait up to this long for other processes to go quiet before starting")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = not args.quick
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    args.min_repeat_s = 0.005 if args.quick else 0.1
    args.budget_s = 0.5 if args.quick else 20.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    z = QUICK if args.quick else (FULL_CUDA if device.type == "cuda" else FULL_CPU)
    if args.batch:
        z = Sizes(args.batch, z.height, z.width, z.channels, z.latent_dim, z.layers, z.samples)
    deadline = time.monotonic() + args.wait_idle
    while True:
        busy = busy_compilers()
        load = other_load()
        if (not busy and (load is None or load <= 0.3)) or time.monotonic() >= deadline:
            break
        print(f"waiting for an idle machine ({fmt(load, '.1f')} cores busy, compilers: {len(busy)})", file=sys.stderr)
        time.sleep(10)
    if load is not None and load > 0.3:
        print(f"warning: {load:.1f} cores busy with other processes; timings will be noisy", file=sys.stderr)
    if busy:
        print(f"warning: compilers running ({', '.join(sorted(set(busy)))}); timings will be noisy", file=sys.stderr)

    print(f"softmix ops benchmark on {device}: {z.describe()}, {args.dtype}", file=sys.stderr)
    copy_numel = (2**22 if args.quick else (2**28 if device.type == "cuda" else 2**26))
    copy_bw = copy_bandwidth(device, copy_numel, args)
    print(f"  copy bandwidth {copy_bw / GB:.1f} GB/s", file=sys.stderr)

    results = Results()
    wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
    for name in wanted:
        if name == "latent_transform":
            bench_latent_transform(z, dtype, device, args, results)
        elif name == "mc_loss":
            bench_mc_loss(z, dtype, device, args, results, "jensen")
            bench_mc_loss(z, dtype, device, args, results, "logmeanexp")
            bench_mc_loss(z, dtype, device, args, results, "logmeanexp", log_weights=True)
        elif name == "denoise_step":
            bench_denoise_step(z, dtype, device, args, results)
        else:
            sys.exit(f"--ops: unknown op {name!r}")
        gc.collect()

    text = report(results, z, dtype, device, copy_bw, copy_numel, args, busy, (load, other_load()))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    failed = [r for r in results.rows if r.fused and r.seconds is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
