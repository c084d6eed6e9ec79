"""Non-finite losses and gradients: stop with an error naming the step and the last good
checkpoint (left intact), or skip the step (no update), up to max_skips in a row."""

import math

import pytest
import torch

from softmix.cli import main
from softmix.train import NonFiniteError, TrainConfig, Trainer, find_checkpoint, load_trained

from _train_helpers import TINY, TINY_CONFIG, one_thread  # noqa: F401


def _poison(monkeypatch, steps):
    """Make the batches of ``steps`` (1-based) carry an infinite example."""
    draw = Trainer.next_batch

    def next_batch(self):
        batch = draw(self)
        if self.step + 1 in steps:
            batch["x0"] = batch["x0"].clone()
            batch["x0"][0] = float("inf")
        return batch

    monkeypatch.setattr(Trainer, "next_batch", next_batch)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _snapshots():
    snaps = {}

    def callback(trainer):
        snaps[trainer.step] = (_weights(trainer), trainer.ema.num_updates)

    return snaps, callback


def test_a_nonfinite_loss_stops_and_names_the_step_and_checkpoint(tmp_path, monkeypatch, one_thread):
    _poison(monkeypatch, {8})
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(data="gmm", iters=20, **TINY_CONFIG))
    snaps, callback = _snapshots()
    with pytest.raises(NonFiniteError) as exc:
        trainer.train(progress=False, out=out, save_every=5, callback=callback)
    message = str(exc.value)
    assert "non-finite loss at step 8" in message and str(out / "checkpoints" / "step-000005") in message
    assert exc.value.step == 8 and trainer.step == 7
    # the last good checkpoint is intact, the failed step wrote nothing, and it resumes
    assert find_checkpoint(out) == out / "checkpoints" / "step-000005"
    saved = load_trained(out, ema=False)[0].state_dict()
    assert all(torch.equal(saved[k], snaps[5][0][k]) for k in saved)
    monkeypatch.undo()
    resumed = Trainer.resume(out)
    assert resumed.step == 5 and math.isfinite(resumed.train_step())


def test_nonfinite_gradients_are_caught_too(one_thread):
    trainer = Trainer(TrainConfig(data="gmm", iters=20, **TINY_CONFIG))
    trainer.train(iters=3, progress=False)
    before = _weights(trainer)
    trainer.model.denoiser.out_proj.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite gradients at step 4.*no checkpoint has been written"):
        trainer.train_step()
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused step changed the weights"


def test_skip_nonfinite_skips_the_update_and_counts(monkeypatch, one_thread):
    _poison(monkeypatch, {8, 9})
    trainer = Trainer(TrainConfig(data="gmm", iters=20, skip_nonfinite=True, **TINY_CONFIG))
    snaps, callback = _snapshots()
    losses = trainer.train(progress=False, callback=callback)
    assert trainer.step == 20 and trainer.skipped_steps == 2 and trainer.consecutive_skips == 0
    assert [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)] == [8, 9]
    w7, w9 = snaps[7][0], snaps[9][0]
    assert all(torch.equal(w7[k], w9[k]) for k in w7), "a skipped step changed the weights"
    assert snaps[9][1] == snaps[7][1] == 7 and trainer.ema.num_updates == 18  # no EMA update either
    assert not all(torch.equal(w9[k], snaps[10][0][k]) for k in w9)  # training goes on
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 18


def test_too_many_skips_in_a_row_stop(monkeypatch, one_thread):
    _poison(monkeypatch, set(range(5, 21)))
    trainer = Trainer(TrainConfig(data="gmm", iters=20, skip_nonfinite=True, max_skips=3, **TINY_CONFIG))
    with pytest.raises(NonFiniteError, match="4 non-finite steps in a row \\(steps 5 to 8; max_skips is 3\\)"):
        trainer.train(progress=False)
    assert trainer.step == 8 and trainer.skipped_steps == 4


def test_the_command_line_reports_both_policies(tmp_path, monkeypatch, capsys, one_thread):
    _poison(monkeypatch, {3})
    out = tmp_path / "stop"
    assert main(["train", "--data", "gmm", "--out", str(out), *TINY, "--iters", "6", "--save-every", "2"]) == 1
    err = capsys.readouterr().err
    assert "softmix train: error: non-finite loss at step 3" in err and "step-000002" in err, err
    out = tmp_path / "skip"
    assert main(["train", "--data", "gmm", "--out", str(out), *TINY, "--iters", "6", "--skip-nonfinite"]) == 0
    captured = capsys.readouterr()
    assert "step 3: non-finite loss, step skipped (1 skipped so far)" in captured.err
    assert "skipped 1 non-finite steps" in captured.out and "final loss nan" not in captured.out
