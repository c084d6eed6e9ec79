"""Checkpoints: safetensors weights plus a JSON config, written atomically.

Every file goes to a temporary name in the same directory, is flushed and fsynced, then
renamed over the final name with ``os.replace`` (atomic on POSIX and Windows): a crash while
writing leaves the previous file intact, never a half-written one.

Training runs keep a series of checkpoints, each a whole directory written the same way
(``atomic_directory``: a hidden temporary directory beside it, renamed into place once every
file is written and fsynced)::

    RUN/checkpoints/step-000100/      complete checkpoints, one per save
    RUN/checkpoints/.step-000200.tmp-*  a save in progress, or torn by a crash: ignored,
                                        removed by ``remove_partial_checkpoints``
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "atomic_write",
    "save_json",
    "load_json",
    "save_tensors",
    "load_tensors",
    "save_smd",
    "load_smd",
    "SMD_CONFIG_NAME",
    "WEIGHTS_NAME",
    "CHECKPOINTS_DIR",
    "atomic_directory",
    "checkpoint_dir_name",
    "list_checkpoints",
    "remove_partial_checkpoints",
    "prune_checkpoints",
    "replace_with_link",
]

SMD_CONFIG_NAME = "smd_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or does not match the model."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (directories: so a rename in them is durable; not on Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")

    atomic_write(path, write)


def _json_default(obj: Any):
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {err}") from err


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a flat dict of tensors as safetensors (shared storage is copied apart)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    flat = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen or (t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        seen.add(key)
        flat[name] = t
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path), device=str(map_location))
    except Exception as err:  # safetensors raises SafetensorError / OSError on bad files
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {err}") from err


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the checkpoint."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the weights in {where} do not match the model: {err}") from err


# ---------------------------------------------------------------------- SMD models


def _denoiser_spec(denoiser: nn.Module) -> dict | None:
    """How to rebuild the denoiser without the user: diffusers models carry their config."""
    cls = type(denoiser)
    if cls.__module__.startswith("diffusers") and hasattr(denoiser, "config"):
        config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
        return {"library": "diffusers", "class": cls.__name__, "config": config}
    return {"library": cls.__module__.split(".")[0], "class": cls.__name__, "config": None}


def save_smd(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write ``smd_config.json`` + ``model.safetensors`` for an ``SMD`` model."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "softmix_class": "SMD",
        "smd": model.smd_config,
        "denoiser": _denoiser_spec(model.denoiser),
    }
    # weights first, config last: a config on disk means the weights beside it are complete
    save_tensors(directory / WEIGHTS_NAME, model.state_dict(), metadata={"format": "pt"})
    save_json(directory / SMD_CONFIG_NAME, config)


def _rebuild_denoiser(spec: dict | None, path: Path) -> nn.Module:
    if spec and spec.get("library") == "diffusers" and spec.get("config") is not None:
        import diffusers

        cls = getattr(diffusers, spec["class"], None)
        if cls is None:
            raise CheckpointError(f"diffusers has no class {spec['class']!r} (saved in {path})")
        return cls.from_config(spec["config"])
    what = f"{spec['library']}.{spec['class']}" if spec else "the denoiser"
    raise CheckpointError(
        f"{path} holds an SMD around {what}, which softmix cannot rebuild by itself: "
        "pass SMD.from_pretrained(path, denoiser=<a freshly built denoiser>)"
    )


def load_smd(
    path: str | os.PathLike,
    denoiser: nn.Module | None = None,
    identifier: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
):
    """Rebuild an ``SMD`` saved by ``save_smd`` and load its weights."""
    from softmix.categorical import DEFAULT_FOURIER_SCALE, DEFAULT_NUM_COMPONENTS
    from softmix.wrap import SMD

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no SMD checkpoint at {path}: not a directory")
    config = load_json(path / SMD_CONFIG_NAME)
    if config.get("softmix_class") != "SMD" or "smd" not in config:
        raise CheckpointError(f"{path / SMD_CONFIG_NAME} is not an SMD config")
    smd = dict(config["smd"])
    if smd.pop("custom_identifier", False) and identifier is None:
        raise CheckpointError(f"{path} was saved with a custom identifier: pass identifier=<a fresh one>")
    if smd.get("identifier") == "categorical":
        identifier = "categorical"
    if denoiser is None:
        denoiser = _rebuild_denoiser(config.get("denoiser"), path)
    model = SMD(
        denoiser,
        latent_dim=smd["latent_dim"],
        hyper_layers=smd["hyper_layers"],
        inject=[tuple(p) for p in smd["inject"]],
        identifier=identifier,
        in_channels=smd["in_channels"],
        noise_channels=smd["noise_channels"],
        identifier_hidden=smd.get("identifier_hidden"),
        num_components=smd.get("num_components", DEFAULT_NUM_COMPONENTS),
        identifier_fourier=smd.get("identifier_fourier", 0),  # saved before the option: none
        identifier_fourier_scale=smd.get("identifier_fourier_scale", DEFAULT_FOURIER_SCALE),
        identifier_grid=smd.get("identifier_grid", 0),  # saved before the option: the average
    )
    state = load_tensors(path / WEIGHTS_NAME, map_location=map_location)
    load_state_into(model, state, str(path / WEIGHTS_NAME))
    return model.to(map_location)


# ---------------------------------------------------------------------- checkpoint series

CHECKPOINTS_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
_PARTIAL_RE = re.compile(r"^\.step-\d+\.(tmp|trash)-")


def checkpoint_dir_name(step: int) -> str:
    """``step-000100``: zero-padded so that a listing sorts by step (up to a million steps)."""
    return f"step-{int(step):06d}"


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory beside ``path``; on a clean exit move it onto ``path``.

    Every file in it is fsynced and the directory renamed into place, so ``path`` appears
    complete or not at all. On an exception the temporary directory is removed; a crash
    (``SIGKILL``, power loss) leaves it behind under a hidden ``.NAME.tmp-*`` name, which
    ``list_checkpoints`` ignores. An existing ``path`` is replaced: it is first renamed to a
    hidden ``.NAME.trash-*`` name, so at no moment does a half-written ``path`` exist.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700)
        if path.exists():
            trash = path.parent / f".{path.name}.trash-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(path, trash)
            os.rename(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(run_dir: str | os.PathLike, is_complete: Callable[[Path], bool] | None = None) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the checkpoints under ``run_dir/checkpoints``, oldest first.

    Temporary and torn directories are skipped, and so is any checkpoint for which
    ``is_complete(path)`` is false (a file missing or of the wrong size).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir() and (is_complete is None or is_complete(entry)):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary directories that interrupted saves left under ``run_dir/checkpoints``."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    removed = []
    for entry in root.iterdir():
        if _PARTIAL_RE.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, is_complete: Callable[[Path], bool] | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints; returns the deleted paths.

    Each is renamed to a hidden trash name before it is deleted, so an interrupted deletion
    never leaves a half-deleted ``step-N`` directory that looks like a checkpoint.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    removed = []
    for step, path in list_checkpoints(run_dir, is_complete)[:-keep]:
        trash = path.parent / f".{path.name}.trash-{os.getpid()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


def replace_with_link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` a copy of ``src`` atomically: a hard link (a copy where links fail) under
    a temporary name, then ``os.replace``. ``src`` must never be modified in place."""
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.link-{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            _fsync_path(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
