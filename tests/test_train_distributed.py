"""Training under torchrun (DDP, gloo on the CPU): the global batch is split over the ranks,
the ranks stay identical, and K processes follow one process's trajectory."""

import json
import os
from pathlib import Path

import pytest
import torch

from softmix.checkpoint import list_checkpoints
from softmix.cli import main
from softmix.train import TrainConfig, Trainer, load_trained

from _train_helpers import KILLED, TINY, one_thread, run, softmix_train, torchrun, torchrun_train, trainer_state  # noqa: F401

WORKER = Path(__file__).parent / "_ddp_worker.py"


def _assert_same_function(a, b, shape):
    """The two models predict the same for fixed inputs and eta. (Not parameter by parameter:
    a bias right before a normalisation has no true gradient, and Adam turns the rounding
    noise of its gradient into lr-sized steps, which the normalisation then cancels.)"""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, *shape, generator=g)
    t = torch.randint(0, 20, (32,), generator=g)
    eta = a.sample_eta(x, g)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x, t, eta=eta), b.eval()(x, t, eta=eta), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("identifier", ["gaussian", "categorical"])
def test_torchrun_two_processes_follow_one_process(tmp_path, identifier):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    args = ("--iters", "20", "--save-every", "10", "--identifier", identifier, "--num-components", "4")
    proc = torchrun_train(ddp, 2, *args)
    assert proc.stdout.count("trained SMD model for 20 steps on 2 processes") == 1, proc.stdout  # rank 0 only
    softmix_train(one, *args)
    for path in (ddp, one):
        assert sorted(os.listdir(path / "checkpoints")) == ["step-000010", "step-000020"]
        model, schedule, cfg, shape = load_trained(path)
        assert type(model).__name__ == "SMD" and shape == (2,) and cfg.batch_size == 64
        assert json.loads((path / "config.json").read_text())["step"] == 20
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2
    # batch_size is the global batch: 2 ranks x 32 examples, drawn as one process draws 64,
    # so the trajectories agree up to the rounding of the gradient all-reduce
    a, b = trainer_state(ddp)["losses"], trainer_state(one)["losses"]
    assert len(a) == len(b) == 20
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=0)
    _assert_same_function(load_trained(ddp, ema=False)[0], load_trained(one, ema=False)[0], (2,))


@pytest.mark.parametrize("data", ["digits"])
def test_ranks_hold_identical_parameters_and_draw_different_batches(tmp_path, data, one_thread):
    torchrun([str(WORKER), str(tmp_path), data])
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert [f["rank"] for f in facts] == [0, 1]
    r0, r1 = facts
    assert r0["wrapper"] == "DistributedDataParallel" and r0["world_size"] == 2 and r0["local_batch"] == 8
    assert r0["params"] == r1["params"], "the ranks' parameters drifted apart"
    assert r0["ema"] == r1["ema"]
    assert r0["losses"] == r1["losses"]  # the all-reduced mean
    for key in ("x0", "t", "noise", "eta"):
        assert r0["first_batch"][key] != r1["first_batch"][key], f"both ranks drew the same {key}"
    # the same run in one process (batch 16 at once) reaches the same weights
    single = Trainer(TrainConfig(data=data, iters=10, batch_size=16, num_steps=20, hidden=8, layers=1,
                                 latent_dim=4, num_samples=2, num_data=256))
    losses = single.train(progress=False)
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    _assert_same_function(load_trained(tmp_path, ema=False)[0], single.model, (1, 8, 8))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000005", "step-000010"]


def test_global_batch_must_split_evenly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "o"), *TINY, "--batch-size", "63"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size 63" in err and "number of processes (2)" in err, err


def test_a_killed_torchrun_run_resumes_exactly(tmp_path):
    """Rank 1 is SIGKILLed at step 15; torchrun then stops rank 0 (which writes the
    checkpoints); the run resumed from step 10 follows the uninterrupted one exactly."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun_train(whole, 2, "--iters", "30", "--save-every", "10")
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "15", "1",
                "train", "--data", "gmm", "--out", str(parts), *TINY, "--iters", "30", "--save-every", "10"],
               check=False)
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(parts)] == [10]
    torchrun_train(parts, 2, "--iters", "30", "--save-every", "10", "--resume")
    a, b = trainer_state(whole), trainer_state(parts)
    assert len(b["rank_rng"]) == 2  # each rank's global RNG state travelled with the checkpoint
    assert a["losses"] == b["losses"] and len(a["losses"]) == 30
    wa, wb = load_trained(whole)[0].state_dict(), load_trained(parts)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_shards_an_smd_model_like_any_module(tmp_path, one_thread):
    """FSDP2 around the SMD wrapper (and its backbone's blocks) trains as one process does."""
    import _sliced_training as worker

    torchrun([str(WORKER.parent / "_fsdp_worker.py"), str(tmp_path)])
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    assert sharded["class"] == "FSDPSMD"
    single = worker.model()
    losses = worker.train(single)
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    reference = single.state_dict()
    assert sharded["state"].keys() == reference.keys()
    probe = worker.model()
    probe.load_state_dict(sharded["state"])
    _assert_same_function(probe, single, (2,))


def test_accelerate_prepares_an_smd_model_like_any_module(tmp_path, one_thread):
    """The README's accelerate recipe (prepare, autocast, backward) under torchrun: DDP, the
    ranks stay identical, and they follow one process on the whole batch."""
    pytest.importorskip("accelerate")
    import _sliced_training as worker

    torchrun([str(WORKER.parent / "_accelerate_worker.py"), str(tmp_path)])
    result = torch.load(tmp_path / "accelerate.pt", weights_only=False)
    assert result["wrapper"] == "DistributedDataParallel"
    r0, r1 = result["rank_params"]
    assert torch.equal(r0, r1), "the ranks' parameters drifted apart"
    single = worker.model()
    losses = worker.train(single)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    probe = worker.model()
    probe.load_state_dict(result["state"])
    _assert_same_function(probe, single, (2,))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_processes(tmp_path, before, after):
    """The global batch does not depend on the number of processes, so a run checkpointed on
    BEFORE processes and resumed on AFTER follows the uninterrupted one-process run."""
    def launch(out, nproc, *extra):
        if nproc == 1:
            return softmix_train(out, *extra)
        return torchrun_train(out, nproc, *extra)

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launch(whole, 1, "--iters", "30", "--save-every", "10")
    launch(parts, before, "--iters", "20", "--save-every", "10")
    launch(parts, after, "--iters", "30", "--save-every", "10", "--resume")
    assert json.loads((parts / "config.json").read_text())["world_size"] == after
    a, b = trainer_state(whole)["losses"], trainer_state(parts)["losses"]
    assert len(a) == len(b) == 30
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=0)
    _assert_same_function(load_trained(parts, ema=False)[0], load_trained(whole, ema=False)[0], (2,))


def test_torch_compile_under_ddp_follows_one_eager_process(tmp_path):
    """``--compile`` under torchrun: DDP around the compiled SMD model tracks one eager
    process up to the compiler's rounding."""
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    torchrun_train(compiled, 2, "--iters", "10", "--compile")
    softmix_train(eager, "--iters", "10")
    a, b = trainer_state(compiled)["losses"], trainer_state(eager)["losses"]
    assert len(a) == len(b) == 10
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=0)
