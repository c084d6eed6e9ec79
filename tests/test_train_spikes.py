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
        snaps[t.step] = (_weights(t), t.ema.num_updates, t.spikes.mean)

    trainer.train(iters=iters, progress=False, callback=callback)
    return snaps


def _record_norms(monkeypatch):
    """The list that every step's gradient norm (before clipping) is appended to."""
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        norm = clip(params, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(T.nn.utils, "clip_grad_norm_", recording_clip)
    return norms


def test_a_spike_is_skipped_and_training_goes_on(monkeypatch, capsys, one_thread):
    _spike(monkeypatch, {9})
    trainer = Trainer(TrainConfig(data="gmm", iters=12, skip_spikes=10.0, **TINY_CONFIG))
    snaps = _run_with_snapshots(trainer, 12)
    assert trainer.step == 12 and trainer.spikes.skips == 1 and len(trainer.losses) == 12
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
    assert trainer.spikes.skips == 0
    assert not all(torch.equal(snaps[8][0][k], snaps[9][0][k]) for k in snaps[8][0])


def test_no_skip_before_the_running_mean_has_seen_the_warmup(monkeypatch, one_thread):
    _spike(monkeypatch, {WARMUP})
    trainer = Trainer(TrainConfig(data="gmm", iters=WARMUP + 2, skip_spikes=10.0, **TINY_CONFIG))
    trainer.train(progress=False)
    assert trainer.spikes.skips == 0


def test_the_running_mean_is_the_textbook_exponential_mean(monkeypatch, one_thread):
    norms = _record_norms(monkeypatch)
    trainer = Trainer(TrainConfig(data="gmm", iters=15, skip_spikes=1e9, **TINY_CONFIG))
    trainer.train(progress=False)
    mean = norms[0]
    for n in norms[1:]:
        mean = 0.99 * mean + 0.01 * n
    assert len(norms) == 15 and math.isclose(trainer.spikes.mean, mean, rel_tol=1e-12)


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
    assert whole.spikes.skips == resumed.spikes.skips == 2
    assert resumed.spikes.mean == whole.spikes.mean and resumed.losses == whole.losses
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


def test_the_filter_follows_the_rule_step_by_step():
    """SpikeFilter against the rule written out: warm-up 2, factor 10, patience 2."""
    spikes = T.SpikeFilter(10.0, warmup=2, patience=2)
    norms = [1.0, 1.0, 50.0, 9.0, 50.0, 50.0, 50.0, 60.0, 1.0]
    decisions = []
    for step, norm in enumerate(norms, start=1):
        skip = spikes.skip(norm, step)
        decisions.append(skip)
        if not skip:
            spikes.took(norm)
        if step == 4:
            assert spikes.mean == 0.99 * (0.99 * 1.0 + 0.01 * 1.0) + 0.01 * 9.0  # step 3 not in it
    # 3: 50 > 10 x 1: skipped; 4: 9 taken; 5, 6: skipped; 7: the third in a row, taken as a new
    # scale (the mean restarts at 50); 8: 60 < 500, taken; 9: taken
    assert decisions == [False, False, True, False, True, True, False, False, False]
    assert spikes.skips == 3 and spikes.in_a_row == 0
    assert spikes.mean == 0.99 * (0.99 * 50.0 + 0.01 * 60.0) + 0.01 * 1.0
    assert not T.SpikeFilter(0.0).skip(1e9, 10**6)  # factor 0: off


def test_a_lasting_change_of_scale_is_taken_after_the_patience(monkeypatch, capsys, one_thread):
    monkeypatch.setattr(T, "SPIKE_PATIENCE", 3)
    _spike(monkeypatch, set(range(8, 13)))
    norms = _record_norms(monkeypatch)
    trainer = Trainer(TrainConfig(data="gmm", iters=12, skip_spikes=10.0, **TINY_CONFIG))
    snaps = _run_with_snapshots(trainer, 12)
    w7, w10, w11 = snaps[7][0], snaps[10][0], snaps[11][0]
    assert all(torch.equal(w7[k], w10[k]) for k in w7), "steps 8-10 should have been skipped"
    assert not all(torch.equal(w10[k], w11[k]) for k in w10), "step 11 should have been taken"
    assert snaps[11][2] == norms[10]  # the mean restarts from step 11's norm
    assert trainer.spikes.skips == 3
    assert "step 11: the gradient norm has been over 10x the running mean 3 steps in a row" in capsys.readouterr().err


def test_a_run_resumed_inside_a_row_of_spikes_counts_on(monkeypatch, one_thread):
    monkeypatch.setattr(T, "SPIKE_PATIENCE", 3)
    _spike(monkeypatch, set(range(8, 13)))
    cfg = dict(data="gmm", iters=14, skip_spikes=10.0, **TINY_CONFIG)
    whole = Trainer(TrainConfig(**cfg))
    whole.train(progress=False)
    first = Trainer(TrainConfig(**cfg))
    first.train(iters=9, progress=False)  # two spikes in a row so far
    assert first.spikes.in_a_row == 2
    resumed = Trainer(TrainConfig(**cfg))
    resumed.load_state_dict(first.state_dict())
    resumed.train(progress=False)
    assert whole.spikes.skips == resumed.spikes.skips == 3 and resumed.losses == whole.losses
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
