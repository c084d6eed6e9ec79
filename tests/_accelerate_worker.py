"""Run under torchrun by tests/test_train_distributed.py (not a test itself).

    torchrun --standalone --nproc_per_node=2 tests/_accelerate_worker.py OUT

The README's recipe for Hugging Face ``accelerate``: ``accelerator.prepare`` an SMD model and
its optimizer, ``training_loss`` inside ``accelerator.autocast()``, ``accelerator.backward``;
each rank on its slice of a global batch. Rank 0 writes the losses, the wrapper's class, every
rank's parameters and the unwrapped state dict to OUT/accelerate.pt.
"""

import sys

import torch
from accelerate import Accelerator

from _sliced_training import model, train

if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    smd = model()
    optimizer = torch.optim.Adam(smd.parameters(), lr=1e-2)
    wrapped, optimizer = accelerator.prepare(smd, optimizer)
    with accelerator.autocast():
        losses = train(wrapped, accelerator.num_processes, accelerator.process_index, optimizer,
                       backward=accelerator.backward)
    params = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(wrapped).parameters()])
    every_rank = accelerator.gather(params[None])  # (ranks, P)
    if accelerator.is_main_process:
        torch.save({"losses": losses, "wrapper": type(wrapped).__name__, "rank_params": every_rank,
                    "state": accelerator.unwrap_model(wrapped).state_dict()}, f"{sys.argv[1]}/accelerate.pt")
    accelerator.wait_for_everyone()  # rank 1 must not tear gloo down while rank 0 still writes
    accelerator.end_training()
