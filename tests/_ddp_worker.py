"""Run under torchrun by tests/test_train_distributed.py (not a test itself).

    torchrun --standalone --nproc_per_node=2 tests/_ddp_worker.py OUT DATA

Trains a tiny model with ``softmix.train.Trainer`` (DDP, gloo), then gathers what each rank
holds (digests of its parameters, EMA and first batch, its losses) and rank 0 writes them to
OUT/facts.json, so the test can compare the ranks with each other.
"""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from softmix.train import TrainConfig, Trainer


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def main(out: str, data: str) -> None:
    cfg = TrainConfig(data=data, iters=10, batch_size=16, num_steps=20, hidden=8, layers=1, latent_dim=4,
                      num_samples=2, num_data=256)
    trainer = Trainer(cfg)
    first = {}
    draw = trainer.next_batch

    def recording_next_batch():
        batch = draw()
        if not first:
            first.update({k: digest(v) for k, v in batch.items()})
        return batch

    trainer.next_batch = recording_next_batch
    trainer.train(progress=False, out=out, save_every=5)
    facts = {
        "rank": dist.get_rank(),
        "world_size": trainer.dist.world_size,
        "local_batch": trainer.local_batch,
        "wrapper": type(trainer.forward_model).__name__,
        "params": digest(torch.cat([p.flatten() for p in trainer.model.parameters()])),
        "ema": digest(torch.cat([v.flatten().float() for v in trainer.ema.shadow.values()])),
        "first_batch": first,
        "losses": trainer.losses,
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    if dist.get_rank() == 0:
        with open(f"{out}/facts.json", "w") as f:
            json.dump(gathered, f)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
