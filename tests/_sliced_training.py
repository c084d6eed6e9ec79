"""A user's own training loop on slices of a global batch, shared by the torchrun workers
(tests/_fsdp_worker.py, tests/_accelerate_worker.py) and the one-process runs they are
compared with: K ranks each on 1/K of every global batch must follow one process on all of it.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist

from softmix import NoiseSchedule, training_loss
from softmix.train import TrainConfig, build_model

STEPS, BATCH, M = 5, 16, 4


def batches(world_size: int, rank: int):
    """The global batches (x0, t, noise, eta), this rank's slice of each."""
    g = torch.Generator().manual_seed(1)
    lo, hi = rank * BATCH // world_size, (rank + 1) * BATCH // world_size
    for _ in range(STEPS):
        x0, t = torch.randn(BATCH, 2, generator=g), torch.randint(0, 20, (BATCH,), generator=g)
        noise, eta = torch.randn(BATCH, 2, generator=g), torch.randn(M, BATCH, 2, generator=g)
        yield x0[lo:hi], dict(t=t[lo:hi], noise=noise[lo:hi], eta=eta[:, lo:hi].reshape(-1, 2))


def train(model, world_size: int = 1, rank: int = 0, optimizer=None,
          backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> list[float]:
    """Adam on the slices; returns the global mean loss of each step."""
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for x0, fixed in batches(world_size, rank):
        loss = training_loss(model, NoiseSchedule(20), x0, num_samples=M, **fixed)
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()
        total = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world_size)
    return losses


def model():
    torch.manual_seed(0)
    return build_model(TrainConfig(hidden=16, layers=2, latent_dim=4), (2,))
