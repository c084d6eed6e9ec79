"""``python -m softmix`` / ``softmix``: train, sample and compare on built-in data.

    softmix train   --data gmm --iters 2000 --out runs/smd
    torchrun --nproc_per_node=2 -m softmix train --data gmm --iters 2000 --out runs/smd
    softmix sample  --checkpoint runs/smd --num 2000 --steps 10 --out samples.png
    softmix compare --data gmm --iters 3000 --num-steps 4 --sample-steps 4 --out runs/compare

``--data`` is ``gmm`` (7x7 grid of Gaussians, the paper's toy), ``gmm-ring`` (8 on a circle),
``gmm-widths`` (the grid with widths 4:1), ``gmm-d8`` / ``gmm-d32`` (16 / 32 modes in 8 / 32
dimensions), ``digits`` (scikit-learn's 8x8 digits) or a folder of images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

__all__ = ["main", "build_parser"]


def _number(parse, what: str, ok):
    """An argparse type: ``parse(text)``, rejected with "expected <what>" unless ``ok(value)``."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return convert


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_nonnegative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: v > 0)


def _final_width(text: str) -> float | str:
    """``--final-width``: ``fit`` or a finite number >= 0."""
    if text == "fit":
        return text
    return _number(float, "'fit' or a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)(text)


def _focus_range(text: str) -> tuple[float, float]:
    """``--timestep-focus-range``: ``LO,HI``, fractions of T with 0 <= LO < HI <= 1."""
    from softmix.schedule import _checked_focus_range

    try:
        return _checked_focus_range(text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected LO,HI such as 0.02,0.1: {err}") from None


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts such as 4,10, got {text!r}") from None
    if not steps or any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"expected positive step counts, got {text!r}")
    return steps


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from softmix.categorical import DEFAULT_NUM_COMPONENTS, LONG_CHAIN_FOURIER, POSITION_GRID
    from softmix.loss import BOUNDS, DEFAULT_CLEAN_HUBER, DEFAULT_CLEAN_WIDTH, SHARPEN_MIN_SIGNAL
    from softmix.schedule import DEFAULT_FOCUS_RANGE, PREDICTION_TYPES, SCHEDULE_KINDS
    from softmix.train import IDENTIFIERS, PRECISIONS, SPIKE_PATIENCE

    p.add_argument("--data", default="gmm", help="gmm | gmm-ring | gmm-widths | gmm-d8 | gmm-d32 | digits | a folder of images (default gmm)")
    p.add_argument("--iters", type=_positive_int, default=2000, help="training steps (default 2000)")
    p.add_argument("--batch-size", type=_positive_int, default=256,
                   help="global batch size (split over the processes under torchrun; default 256)")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--lr-warmup", type=_nonnegative_int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--num-steps", type=_positive_int, default=1000, help="diffusion steps T of the training schedule")
    p.add_argument("--schedule", choices=SCHEDULE_KINDS, default="linear")
    p.add_argument("--timestep-focus", type=_number(float, "a share in [0, 1]", lambda v: 0 <= v <= 1), default=0.0,
                   help="share of each batch drawn on the steps of --timestep-focus-range, the rest uniform "
                        "(default 0: uniform; 0.3 helped the categorical identifier on the toy, with the Huber tail at 4 to 1000 steps)")
    p.add_argument("--timestep-focus-range", type=_focus_range, default=DEFAULT_FOCUS_RANGE, metavar="LO,HI",
                   help="the focus steps as fractions of T (default 0.02,0.1: t = 20 .. 99 of 1000)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon")
    p.add_argument("--latent-dim", type=_positive_int, default=16, help="SMD latent size D")
    p.add_argument("--hyper-layers", type=_positive_int, default=2, help="SMD head layers L")
    p.add_argument("--inject", default="output",
                   help="output (before the last layer; default) | auto (also after the first) | input | "
                        "comma-separated module names")
    p.add_argument("--num-samples", type=_positive_int, default=None, help="Monte Carlo samples M of eta")
    p.add_argument("--identifier", choices=IDENTIFIERS, default="gaussian",
                   help="gaussian: z = g(eta, x_t, t), the paper's (default) | categorical: K learned codes "
                        "with x_t-dependent weights, trained on the exact mixture likelihood of x0 "
                        "(use with --prediction-type sample)")
    p.add_argument("--num-components", type=_positive_int, default=DEFAULT_NUM_COMPONENTS,
                   help=f"K of --identifier categorical (default {DEFAULT_NUM_COMPONENTS}; at least about the number of modes)")
    p.add_argument("--bound", choices=BOUNDS, default=None,
                   help="training bound (default: the library's, posterior; clean for --identifier categorical)")
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.add_argument("--clean-width", type=_positive_float, default=DEFAULT_CLEAN_WIDTH,
                   help=f"--bound clean: each component's width around its x0 estimate, in data units "
                        f"(default {DEFAULT_CLEAN_WIDTH})")
    p.add_argument("--clean-huber", type=_number(float, "0 (off) or a number of widths > 0", lambda v: 0 <= v < math.inf),
                   default=None, metavar="H",
                   help="--bound clean: beyond H widths from x0 the loss grows linearly in the distance, so one "
                        f"example far from every component cannot carry a step (0: off; default {DEFAULT_CLEAN_HUBER})")
    p.add_argument("--sharpen", type=_positive_float, default=1.0, metavar="F",
                   help="--bound posterior: train the last steps (alpha_bar_t >= --sharpen-min-signal) as if their "
                        "Gaussian were F times narrower (1: off, the default; 5 measured on digits at 10 steps)")
    p.add_argument("--sharpen-min-signal", type=_number(float, "a share in [0, 1]", lambda v: 0 <= v <= 1),
                   default=SHARPEN_MIN_SIGNAL, metavar="A",
                   help=f"--sharpen: the steps whose alpha_bar_t >= A (default {SHARPEN_MIN_SIGNAL})")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--hidden", type=_positive_int, default=128, help="backbone width")
    p.add_argument("--layers", type=_positive_int, default=3, help="backbone depth")
    p.add_argument("--fourier", type=_nonnegative_int, default=64,
                   help="vector data: random Fourier features of x_t in the MLP backbone (0: none; default 64)")
    p.add_argument("--identifier-fourier", type=_nonnegative_int, default=0,
                   help="vector data, --identifier categorical: random Fourier features of x_t for its "
                        f"mixture weights (0: none, the default; {LONG_CHAIN_FOURIER} for chains of hundreds of steps)")
    p.add_argument("--identifier-grid", type=_nonnegative_int, default=None, metavar="G",
                   help="images, --identifier categorical: its mixture weights see the features on a G x G grid "
                        f"of positions (default {POSITION_GRID}); 0: their average over positions")
    p.add_argument("--num-data", type=_positive_int, default=20000, help="training points drawn from the toy mixtures")
    p.add_argument("--image-size", type=_positive_int, default=32, help="image folders are resized to this")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image folders: 1 grey or 3 RGB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun each process takes cuda:LOCAL_RANK)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: recompute the backbone's blocks in the backward pass")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps whose loss or gradients are not finite (default: stop with an error)")
    p.add_argument("--skip-spikes", type=_number(float, "0 (off) or a factor > 1", lambda v: v == 0 or 1 < v < math.inf),
                   default=0.0, metavar="FACTOR",
                   help="skip a step whose gradient norm is over FACTOR times the running mean (e.g. 10; default 0: "
                        f"off); after {SPIKE_PATIENCE} such steps in a row the next is taken as a new scale")
    p.add_argument("--max-skips", type=_nonnegative_int, default=10,
                   help="with --skip-nonfinite, stop after more than this many non-finite steps in a row")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads_arg(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's own choice, all cores); use 1 for each of "
                        "several runs that share a machine, whose threads would otherwise fight for the cores")


def _add_sample_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    from softmix.sampling import METHODS

    if many:
        p.add_argument("--sample-steps", type=_steps_list, default=[4, 10],
                       help="comma-separated sampling step counts (default 4,10)")
    else:
        p.add_argument("--steps", type=_positive_int, default=10, help="sampling steps (respaced)")
    p.add_argument("--method", choices=tuple(METHODS), default="ddpm")
    p.add_argument("--num", type=_positive_int, default=2000, help="number of samples")
    p.add_argument("--clip-sample", type=_positive_float, default=None)
    p.add_argument("--final-width", type=_final_width, default=0.0,
                   help="draw each SMD sample from N(x0_hat, w^2 I) around the last step's estimate (default 0: "
                        "take it); 'fit': the categorical model's component width fitted to 2000 points of "
                        "the data (softmix.loss.fit_final_width)" + (
                            "; the plain model's samples are left as they are" if many else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softmix",
        description="Soft Mixture Denoising (SMD) for diffusion models: train, sample, compare.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,compare}")
    sub.required = True

    p = sub.add_parser("train", help="train an SMD (or --plain) model and write a checkpoint")
    _add_train_args(p)
    p.add_argument("--plain", action="store_true", help="train the plain model (no SMD head)")
    p.add_argument("--out", required=True, help="run directory (checkpoints/step-N/ plus the latest checkpoint's files)")
    p.add_argument("--save-every", type=_positive_int, default=None, help="also checkpoint every N steps")
    p.add_argument("--keep", type=_positive_int, default=None, help="keep only the newest N checkpoints (default all)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest complete checkpoint (its saved settings; "
                        "--iters, and --compile / --grad-checkpoint / --skip-nonfinite when given, apply)")

    p = sub.add_parser("sample", help="draw samples from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="directory written by `softmix train`")
    _add_sample_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not their EMA")
    p.add_argument("--out", required=True, help="output file: .png (plot), .pt or .npy (tensor)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    _add_threads_arg(p)

    p = sub.add_parser("compare", help="train SMD and the plain model with the same budget; write a PNG and metrics")
    _add_train_args(p)
    _add_sample_args(p, many=True)
    p.add_argument("--out", required=True, help="output directory (compare.png, metrics.md, metrics.json, checkpoints)")
    return parser


# ---------------------------------------------------------------------- validation


def _check_data(parser: argparse.ArgumentParser, args) -> None:
    from softmix.data import DATA_NAMES, IMAGE_SUFFIXES

    if args.data in DATA_NAMES or args.data == "gmm-grid":
        return
    path = Path(args.data)
    if not path.exists():
        parser.error(f"unknown data {args.data!r}: expected one of {', '.join(DATA_NAMES)} or an image folder")
    if not path.is_dir():
        parser.error(f"--data {args.data!r} is a file; expected a folder of images")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        parser.error(f"image folder {args.data!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")


def _config_from_args(args, smd: bool):
    from softmix.train import TrainConfig

    inject = args.inject
    if "," in inject:
        inject = [s.strip() for s in inject.split(",") if s.strip()]
    return TrainConfig(
        data=args.data, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
        num_steps=args.num_steps, schedule=args.schedule, prediction_type=args.prediction_type,
        timestep_focus=args.timestep_focus, timestep_focus_range=args.timestep_focus_range,
        smd=smd, latent_dim=args.latent_dim, hyper_layers=args.hyper_layers, inject=inject,
        num_samples=args.num_samples, bound=args.bound, temperature=args.temperature,
        clean_width=args.clean_width, clean_huber=args.clean_huber, identifier=args.identifier,
        sharpen=args.sharpen, sharpen_min_signal=args.sharpen_min_signal, identifier_grid=args.identifier_grid,
        num_components=args.num_components,
        ema_decay=args.ema_decay, seed=args.seed, hidden=args.hidden, layers=args.layers,
        fourier=args.fourier, identifier_fourier=args.identifier_fourier,
        num_data=args.num_data, image_size=args.image_size, channels=args.channels, device=args.device,
        lr_warmup=args.lr_warmup, precision=args.precision, compile=args.compile,
        grad_checkpoint=args.grad_checkpoint, skip_nonfinite=args.skip_nonfinite, max_skips=args.max_skips,
        skip_spikes=args.skip_spikes,
    )


def _check_train(parser, args) -> None:
    _check_data(parser, args)
    if not 0.0 <= args.ema_decay <= 1.0:
        parser.error(f"--ema-decay must lie in [0, 1], got {args.ema_decay}")
    if args.device != "cpu":
        import torch

        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as err:
            parser.error(f"--device {args.device!r} is not usable here: {err}")


# ---------------------------------------------------------------------- commands


def _build_trainer(parser, cfg):
    from softmix.train import Trainer

    try:
        return Trainer(cfg)
    except ValueError as err:  # bad injection names, unreadable images, batch vs processes...
        parser.error(str(err))


def _holds_run(out: Path) -> bool:
    """Whether ``out`` already holds a training run (checkpoints or a flat checkpoint)."""
    from softmix.checkpoint import CHECKPOINTS_DIR

    if any((out / CHECKPOINTS_DIR).glob("step-*")):
        return True
    try:
        return json.loads((out / "config.json").read_text()).get("format") == "softmix-train"
    except (OSError, ValueError):
        return False


def cmd_train(parser, args) -> int:
    from softmix import distributed

    try:
        code = _train(parser, args)
    except BaseException:
        distributed.cleanup(wait=False)  # under torchrun: leave the process group on every exit path
        raise
    distributed.cleanup()
    return code


def _train(parser, args) -> int:
    from softmix import distributed
    from softmix.checkpoint import CheckpointError
    from softmix.train import NonFiniteError, Trainer

    _check_train(parser, args)
    world = distributed.env_world_size()
    if not args.resume and args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is the global batch and must be divisible by the "
                     f"number of processes ({world})")
    out = Path(args.out)
    if args.resume:
        overrides = {"iters": args.iters}
        for flag in ("compile", "grad_checkpoint", "skip_nonfinite"):
            if getattr(args, flag):
                overrides[flag] = True
        try:
            trainer = Trainer.resume(out, **overrides)
        except CheckpointError as err:
            parser.error(f"--resume: {err}")
        except ValueError as err:
            parser.error(f"--resume: {err}")
    else:
        if _holds_run(out):
            parser.error(f"--out {args.out} already holds a training run; pass --resume to continue it, "
                         "or choose another --out")
        trainer = _build_trainer(parser, _config_from_args(args, smd=not args.plain))
    main_rank = trainer.dist.is_main
    start = time.time()
    try:
        losses = trainer.train(progress=not args.no_progress, out=out, save_every=args.save_every, keep=args.keep)
    except NonFiniteError as err:
        if main_rank:
            print(f"softmix train: error: {err}", file=sys.stderr)
        return 1
    if main_rank:
        tail = [v for v in losses[-50:] if v == v and abs(v) != float("inf")] or [float("nan")]
        procs = f" on {trainer.dist.world_size} processes" if trainer.dist.distributed else ""
        skipped = f"; skipped {trainer.skipped_steps} non-finite steps" if trainer.skipped_steps else ""
        skipped += f"; skipped {trainer.spikes.skips} gradient spikes" if trainer.spikes.skips else ""
        print(f"trained {'SMD' if trainer.cfg.smd else 'plain'} model for {trainer.step} steps{procs} in "
              f"{time.time() - start:.1f}s; final loss {sum(tail) / len(tail):.4f}{skipped}; "
              f"checkpoint: {trainer.last_checkpoint}")
    return 0


def _draw(model, schedule, shape, steps, method, seed, num, progress, clip_sample, prediction_type, device="cpu",
          final_width=0.0):
    import torch

    from softmix.sampling import sample

    g = torch.Generator(device=device).manual_seed(seed)
    return sample(model, schedule, (num, *shape), steps=steps, method=method, generator=g, progress=progress,
                  clip_sample=clip_sample, prediction_type=prediction_type, device=device, final_width=final_width)


def _resolve_final_width(parser, value, model, schedule, data, steps, prediction_type, seed, device="cpu") -> float:
    """``--final-width`` as a number: ``fit`` fits it to 2000 points of ``data`` (a categorical SMD model only)."""
    if value != "fit":
        return float(value)
    import torch

    from softmix.loss import fit_final_width
    from softmix.wrap import _unwrap, is_smd

    if not (is_smd(model) and _unwrap(model).categorical):
        parser.error("--final-width fit needs an SMD model with --identifier categorical")
    g = torch.Generator().manual_seed(seed + 54321)
    x0 = data[torch.randperm(data.shape[0], generator=g)[:2000]].to(device)
    width = fit_final_width(model, schedule, x0, steps=steps, prediction_type=prediction_type, generator=g)
    print(f"fitted final width: {width:.4g} ({steps} steps)")
    return width


def cmd_sample(parser, args) -> int:
    import torch

    from softmix.checkpoint import CheckpointError
    from softmix.train import load_trained

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pt", ".npy"):
        parser.error(f"--out must end in .png, .pt or .npy, got {args.out!r}")
    try:
        model, schedule, cfg, shape = load_trained(args.checkpoint, ema=not args.no_ema, device=args.device)
    except CheckpointError as err:
        parser.error(str(err))
    if args.steps > schedule.num_steps:
        parser.error(f"--steps {args.steps} is larger than the model's schedule ({schedule.num_steps} steps)")
    width = args.final_width
    if width == "fit":
        from softmix.data import load_data

        data, _ = load_data(cfg.data, cfg.num_data, torch.Generator().manual_seed(cfg.seed + 1),
                            image_size=cfg.image_size, channels=cfg.channels)  # fresh draws for the toys
        width = _resolve_final_width(parser, width, model, schedule, data, args.steps, cfg.prediction_type,
                                     args.seed, args.device)
    elif width and not cfg.smd:
        parser.error("--final-width applies to SMD models; this checkpoint is a plain model")
    x = _draw(model, schedule, shape, args.steps, args.method, args.seed, args.num, not args.no_progress,
              args.clip_sample, cfg.prediction_type, args.device, final_width=width).cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".pt":
        torch.save(x, out)
    elif out.suffix.lower() == ".npy":
        import numpy as np

        np.save(out, x.numpy())
    else:
        from softmix.plots import plot_panels

        plot_panels([(f"{'SMD' if cfg.smd else 'plain'}, {args.steps} steps ({args.method})", x)], out)
    print(f"wrote {args.num} samples to {out}")
    return 0


def cmd_compare(parser, args) -> int:
    import torch

    from softmix.metrics import mixture_metrics, mmd
    from softmix.plots import plot_compare

    _check_train(parser, args)
    from softmix.distributed import env_world_size

    if env_world_size() > 1:
        parser.error("compare runs in one process; use torchrun with `softmix train`")
    for s in args.sample_steps:
        if s > args.num_steps:
            parser.error(f"--sample-steps {s} is larger than the schedule's --num-steps {args.num_steps}")
    if args.final_width == "fit" and args.identifier != "categorical":  # before minutes of training
        parser.error("--final-width fit needs an SMD model with --identifier categorical")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    results, panels, timings, final_widths = {}, {}, {}, {}
    data = mixture = None
    for name, smd in (("plain", False), ("SMD", True)):
        trainer = _build_trainer(parser, _config_from_args(args, smd=smd))
        start = time.time()
        trainer.train(progress=progress)
        timings[name] = time.time() - start
        trainer.save(out / name.lower())
        data, mixture = trainer.data.cpu(), trainer.mixture
        model = trainer.ema_model()
        shape = tuple(data.shape[1:])
        for steps in args.sample_steps:
            width = 0.0
            if smd and args.final_width:
                width = _resolve_final_width(parser, args.final_width, model, trainer.schedule, trainer.data, steps,
                                             trainer.cfg.prediction_type, args.seed, args.device)
                final_widths[str(steps)] = width
            x = _draw(model, trainer.schedule, shape, steps, args.method, args.seed, args.num, progress,
                      args.clip_sample, trainer.cfg.prediction_type, args.device, final_width=width).cpu()
            panels[(name, steps)] = x
            ref_gen = torch.Generator().manual_seed(args.seed + 12345)
            if mixture is not None:
                reference = mixture.sample(args.num, ref_gen)
                m = mixture_metrics(x, mixture, reference)
            else:
                idx = torch.randperm(data.shape[0], generator=ref_gen)[: args.num]
                m = {"mmd": mmd(x, data[idx], bandwidths=(1.0, 2.0, 5.0, 10.0))}
            m["finite"] = bool(torch.isfinite(x).all())
            results.setdefault(name, {})[str(steps)] = m
    plot_compare(data, panels, args.sample_steps, out / "compare.png", title=f"{args.data}: plain vs SMD ({args.method})")
    meta = {"data": args.data, "iters": args.iters, "method": args.method, "num_samples_drawn": args.num,
            "train_seconds": timings, "config": asdict(_config_from_args(args, smd=True)), "metrics": results,
            "smd_final_width": final_widths}
    (out / "metrics.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    table = _markdown_table(results, args.sample_steps)
    (out / "metrics.md").write_text(
        f"# plain vs SMD on {args.data}\n\n{args.iters} training steps each, T = {args.num_steps}, "
        f"{args.num} samples, {args.method} sampling.\n\n{table}\n")
    print(table)
    print(f"wrote {out / 'compare.png'}, {out / 'metrics.md'}, {out / 'metrics.json'}")
    return 0


def _markdown_table(results: dict, steps_list) -> str:
    keys = [k for k in ("mmd", "high_quality", "modes_covered", "nll") if k in results["plain"][str(steps_list[0])]]
    header = "| model | steps | " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for steps in steps_list:
        for name in ("plain", "SMD"):
            m = results[name][str(steps)]
            cells = []
            for k in keys:
                v = m[k]
                cells.append(f"{v}/{m['num_modes']}" if k == "modes_covered" else f"{v:.4g}")
            lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    commands = {"train": cmd_train, "sample": cmd_sample, "compare": cmd_compare}
    return commands[args.command](parser, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
