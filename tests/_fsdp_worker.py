"""Run under torchrun by tests/test_train_distributed.py (not a test itself).

    torchrun --standalone --nproc_per_node=2 tests/_fsdp_worker.py OUT

Trains an SMD model sharded with FSDP2 (``fully_shard`` on each backbone block, then on the
SMD wrapper) for a few steps, each rank on its slice of a global batch, and rank 0 writes the
losses and the gathered full state dict to OUT, for comparison with one unsharded process.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

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


def train(model, world_size: int = 1, rank: int = 0) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for x0, fixed in batches(world_size, rank):
        loss = training_loss(model, NoiseSchedule(20), x0, num_samples=M, **fixed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world_size)
    return losses


def model():
    torch.manual_seed(0)
    return build_model(TrainConfig(hidden=16, layers=2, latent_dim=4), (2,))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    smd = model()
    for block in smd.denoiser.blocks:
        fully_shard(block)
    fully_shard(smd)  # the root unit: identifier, heads, projections (what the hooks use)
    losses = train(smd, dist.get_world_size(), dist.get_rank())
    state = get_model_state_dict(smd, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "state": state, "class": type(smd).__name__}, f"{sys.argv[1]}/fsdp.pt")
    dist.barrier()  # rank 1 must not tear gloo down while rank 0 still writes
    dist.destroy_process_group()
