"""Process-group and rank helpers for training under ``torchrun``.

``torchrun --nproc_per_node=K ...`` starts K processes and sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in each one's environment. ``setup`` reads them, initialises the default
process group (NCCL for CUDA devices, gloo for CPUs) and picks the GPU from ``LOCAL_RANK``;
without them (or with ``WORLD_SIZE=1``) it does nothing and every helper here acts as in a
single process, so the trainer has one code path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "env_world_size",
    "setup",
    "cleanup",
    "is_initialized",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_mean",
    "all_gather_object",
    "broadcast_object",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 outside ``torchrun``)."""
    return _env_int("WORLD_SIZE", 1)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(device: str | torch.device = "cpu") -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` prepared; return ``(info, device)``.

    With ``WORLD_SIZE > 1``: a CUDA ``device`` (``"cuda"`` or ``"cuda:N"``) becomes
    ``cuda:LOCAL_RANK`` and the NCCL backend is used; a CPU device uses gloo. When the
    default group already exists (the caller initialised it) it is reused. Otherwise
    returns a single-process ``DistInfo`` and ``device`` unchanged.
    """
    device = torch.device(device)
    if is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    else:
        size = env_world_size()
        if size <= 1:
            return DistInfo(), device
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        info = DistInfo(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)  # before init: NCCL binds to the current device
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info, device


def cleanup(wait: bool = True) -> None:
    """Destroy the default process group (if any).

    ``wait``: first wait for every rank to get here. A rank that tears down gloo while a peer
    still works in the group (rank 0 writing a checkpoint) can abort in C++ ("terminate
    called without an active exception"). Pass ``wait=False`` on error paths, where a peer
    that died would leave the barrier waiting.
    """
    if is_initialized():
        if wait:
            barrier()
            _wait_until_every_rank_left_the_barrier()
        dist.destroy_process_group()


def _wait_until_every_rank_left_the_barrier(timeout_s: float = 60.0) -> None:
    """Count the ranks past the final barrier in the rendezvous store, and return when all are.

    A gloo barrier can return on one rank while a peer is still finishing it; tearing gloo
    down then can still abort that peer (seen once in CI, 2026-11-29, after 20 training steps
    on 2 processes). The store is outside gloo, so once every rank has counted itself here, no
    rank is inside a gloo collective any more.
    """
    world = dist.get_world_size()
    if world == 1:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # a private helper: gone in some torch, keep the barrier alone
        return
    key = "softmix/left-final-barrier"
    count, deadline = store.add(key, 1), time.monotonic() + timeout_s
    while count % world and time.monotonic() < deadline:  # % world: a later group in this job counts on
        time.sleep(0.01)
        count = store.add(key, 0)


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (a new tensor; ``value`` itself outside a group).

    SUM then divide: gloo has no AVG reduction.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` outside a group)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
