"""skip_spikes: a step whose gradient norm is a spike over the running mean is refused (no
update of weights, optimiser, EMA or running mean); a resumed run keeps the running mean."""

import math

import pytest
import torch

from softmix import train as T
from softmix.cli import main
from softmix.train import TrainConfig, Trainer

from _train_helpers import TINY, TINY_CONFIG, one_thread  # noqa: F401

WARMUP = 5


@pytest.fixture(autouse=True)
def short_warmup(monkeypatch):
    monkeypatch.setattr(T, "SPIKE_WARMUP_STEPS", WARMUP)


def _spike(monkeypatch, steps, scale=300.0):
    """Make the batches of ``steps`` (1-based) far outside the data: a huge loss and gradient."""
    draw = Trainer.next_batch

    def next_batch(self):
        batch = draw(self)
        if self.step + 1 in steps:
            batch["x0"] = batch["x0"] * scale
        return batch

    monkeypatch.setattr(Trainer, "next_batch", next_batch)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _run_with_snapshots(trainer, iters):
    snaps = {}

    def callback(t):
        snaps[t.step] = (_weights(t), t.ema.num_updates, t.grad_norm_mean)

    trainer.train(iters=iters, progress=False, callback=callback)
    return snaps


def test_a_spike_is_skipped_and_training_goes_on(monkeypatch, capsys, one_thread):
    _spike(monkeypatch, {9})
    trainer = Trainer(TrainConfig(data="gmm", iters=12, skip_spikes=10.0, **TINY_CONFIG))
    snaps = _run_with_snapshots(trainer, 12)
    assert trainer.step == 12 and trainer.spike_skips == 1 and len(trainer.losses) == 12
    w8, w9 = snaps[8][0], snaps[9][0]
    assert all(torch.equal(w8[k], w9[k]) for k in w8), "a skipped spike changed the weights"
    assert snaps[9][1] == snaps[8][1] == 8 and trainer.ema.num_updates == 11  # nor the EMA
    assert snaps[9][2] == snaps[8][2]  # nor the running mean
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 11
    assert not all(torch.equal(w9[k], snaps[10][0][k]) for k in w9)  # training goes on
    assert trainer.losses[8] > 10 * trainer.losses[7]  # the spike's loss is recorded
    assert "step 9: gradient norm" in capsys.readouterr().err


def test_without_skip_spikes_the_same_batch_updates(monkeypatch, one_thread):
    _spike(monkeypatch, {9})
    trainer = Trainer(TrainConfig(data="gmm", iters=12, **TINY_CONFIG))
    snaps = _run_with_snapshots(trainer, 12)
    assert trainer.spike_skips == 0
    assert not all(torch.equal(snaps[8][0][k], snaps[9][0][k]) for k in snaps[8][0])


def test_no_skip_before_the_running_mean_has_seen_the_warmup(monkeypatch, one_thread):
    _spike(monkeypatch, {WARMUP})
    trainer = Trainer(TrainConfig(data="gmm", iters=WARMUP + 2, skip_spikes=10.0, **TINY_CONFIG))
    trainer.train(progress=False)
    assert trainer.spike_skips == 0


def test_the_running_mean_is_the_textbook_exponential_mean(monkeypatch, one_thread):
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        norm = clip(params, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(T.nn.utils, "clip_grad_norm_", recording_clip)
    trainer = Trainer(TrainConfig(data="gmm", iters=15, skip_spikes=1e9, **TINY_CONFIG))
    trainer.train(progress=False)
    mean = norms[0]
    for n in norms[1:]:
        mean = 0.99 * mean + 0.01 * n
    assert len(norms) == 15 and math.isclose(trainer.grad_norm_mean, mean, rel_tol=1e-12)


def test_a_resumed_run_keeps_the_running_mean_and_the_count(monkeypatch, one_thread):
    _spike(monkeypatch, {9, 14})
    cfg = dict(data="gmm", iters=16, skip_spikes=10.0, **TINY_CONFIG)
    whole = Trainer(TrainConfig(**cfg))
    whole.train(progress=False)
    first = Trainer(TrainConfig(**cfg))
    first.train(iters=10, progress=False)
    resumed = Trainer(TrainConfig(**cfg))
    resumed.load_state_dict(first.state_dict())
    resumed.train(progress=False)
    assert whole.spike_skips == resumed.spike_skips == 2
    assert resumed.grad_norm_mean == whole.grad_norm_mean and resumed.losses == whole.losses
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("factor", [-1.0, 0.5, 1.0, float("inf"), float("nan")])
def test_bad_factors_are_refused(factor, tmp_path, capsys):
    with pytest.raises(ValueError, match="skip_spikes must be 0 \\(off\\) or a finite factor > 1"):
        TrainConfig(skip_spikes=factor).validate()
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--skip-spikes", str(factor)])
    assert "expected 0 (off) or a factor > 1" in capsys.readouterr().err


def test_the_command_line_reports_the_skips(tmp_path, monkeypatch, capsys, one_thread):
    _spike(monkeypatch, {8})
    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--out", str(out), *TINY, "--iters", "10", "--skip-spikes", "10"]) == 0
    captured = capsys.readouterr()
    assert "step 8: gradient norm" in captured.err and "skipped 1 gradient spikes" in captured.out
