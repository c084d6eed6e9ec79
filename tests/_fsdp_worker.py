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

from _sliced_training import model, train


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
