"""The training timesteps: uniform by default, or a share focused on some steps."""

import json
import math
from dataclasses import asdict

import pytest
import torch

from softmix import NoiseSchedule
from softmix.cli import main
from softmix.train import TrainConfig, Trainer

from test_cli import TINY, _fails


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_default_draws_are_plain_uniform_integers():
    seed = _fresh_seed()
    t = NoiseSchedule(37).sample_timesteps(500, generator=torch.Generator().manual_seed(seed))
    ref = torch.randint(0, 37, (500,), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(t, ref)
    t0 = NoiseSchedule(37).sample_timesteps(500, generator=torch.Generator().manual_seed(seed), focus=0.0)
    assert torch.equal(t0, ref)


@pytest.mark.parametrize("T, focus_range, lo, hi", [
    (1000, (0.02, 0.1), 20, 100),  # the default: t = 20 .. 99 of a 1000-step chain
    (50, (0.02, 0.1), 1, 5),
    (4, (0.02, 0.1), 0, 1),  # floor(0.4) = 0: never empty, the first step
    (10, (0.99, 1.0), 9, 10),
    (1, (0.5, 1.0), 0, 1),
    (7, (0.0, 1.0), 0, 7),
])
def test_focus_steps(T, focus_range, lo, hi):
    assert NoiseSchedule(T).focus_steps(focus_range) == (lo, hi)


def test_probabilities_follow_the_mixture_formula():
    p = NoiseSchedule(1000).timestep_probabilities(0.3)
    ref = torch.full((1000,), 0.7 / 1000, dtype=torch.float64)
    ref[20:100] = 0.7 / 1000 + 0.3 / 80
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-15)
    assert math.isclose(p.sum().item(), 1.0, abs_tol=1e-12)
    uniform = NoiseSchedule(9).timestep_probabilities(1.0, (0.0, 1.0))
    torch.testing.assert_close(uniform, torch.full((9,), 1 / 9, dtype=torch.float64))


@pytest.mark.parametrize("focus, focus_range", [(0.3, (0.1, 0.3)), (1.0, (0.5, 0.6)), (0.05, (0.0, 0.04))])
def test_draws_follow_the_probabilities(focus, focus_range):
    T, n = 50, 200_000
    schedule = NoiseSchedule(T)
    g = torch.Generator().manual_seed(_fresh_seed())
    t = schedule.sample_timesteps(n, generator=g, focus=focus, focus_range=focus_range)
    assert t.dtype == torch.long and t.shape == (n,) and 0 <= t.min() and t.max() < T
    counts = torch.bincount(t, minlength=T).double()
    expected = n * schedule.timestep_probabilities(focus, focus_range)
    support = expected > 0
    assert counts[~support].sum() == 0  # focus = 1: nothing outside the focus steps
    # Pearson's chi-squared: mean df, sd sqrt(2 df); 6 sd is a false alarm once in ~1e9
    df = int(support.sum()) - 1
    chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)


@pytest.mark.parametrize("focus, focus_range, message", [
    (-0.1, (0.02, 0.1), r"focus must lie in \[0, 1\]"),
    (1.5, (0.02, 0.1), r"focus must lie in \[0, 1\]"),
    (float("nan"), (0.02, 0.1), r"focus must lie in \[0, 1\]"),
    (0.3, (0.1, 0.1), "focus_range must satisfy 0 <= lo < hi <= 1"),
    (0.3, (0.2, 0.1), "focus_range must satisfy 0 <= lo < hi <= 1"),
    (0.3, (0.0, 1.5), "focus_range must satisfy 0 <= lo < hi <= 1"),
    (0.3, (0.1,), "focus_range must be two numbers"),
    (0.3, "ab", "focus_range must be two numbers"),
    (None, (0.02, 0.1), r"focus must lie in \[0, 1\]"),
])
def test_bad_focus_is_refused(focus, focus_range, message):
    with pytest.raises(ValueError, match="^" + message):
        NoiseSchedule(100).sample_timesteps(4, focus=focus, focus_range=focus_range)
    with pytest.raises(ValueError, match="^timestep_" + message):
        TrainConfig(timestep_focus=focus, timestep_focus_range=focus_range).validate()


def test_trainer_draws_its_batches_from_the_focus():
    cfg = TrainConfig(iters=1, batch_size=64, num_steps=40, hidden=16, layers=1, latent_dim=4, num_data=256,
                      timestep_focus=1.0, timestep_focus_range=(0.5, 0.75))
    trainer = Trainer(cfg)
    t = torch.cat([trainer.next_batch()["t"] for _ in range(5)])
    assert t.min() >= 20 and t.max() < 30 and len(t.unique()) > 1
    # the range survives the round trip through config.json as the tuple it was
    assert TrainConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg


def test_cli_takes_the_focus(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--timestep-focus", "0.3", "--timestep-focus-range", "0.1,0.2"]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["timestep_focus"] == 0.3 and config["timestep_focus_range"] == [0.1, 0.2]
    _fails(["train", "--out", str(out), "--timestep-focus", "1.5"], capsys, "expected a share in [0, 1]")
    _fails(["train", "--out", str(out), "--timestep-focus-range", "0.3,0.1"], capsys, "0 <= lo < hi <= 1")
    _fails(["train", "--out", str(out), "--timestep-focus-range", "0.3"], capsys, "expected LO,HI")
