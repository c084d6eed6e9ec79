"""Checkpoints of a training run: a run killed and resumed follows the uninterrupted run
exactly; a crash while writing a checkpoint leaves the previous one complete; --keep."""

import json
import os
import textwrap

import pytest
import torch

from softmix.checkpoint import list_checkpoints
from softmix.cli import main
from softmix.train import TrainConfig, Trainer, find_checkpoint, load_trained

from _train_helpers import KILLED, TINY, TINY_CONFIG, one_thread, run, trainer_state  # noqa: F401

RUN = ["--iters", "30", "--save-every", "10", "--lr-warmup", "5"]

# `softmix train ...` that dies (os._exit: no cleanup, no exception handlers) halfway through
# writing the checkpoint of step CRASH_AT: the weights are written, the rest is not.
TORN = textwrap.dedent("""
    import os, sys
    from softmix import train as T
    CRASH_AT = int(sys.argv[1])
    original = T.Trainer._write_files
    def write_files(self, directory, state):
        if self.step == CRASH_AT:
            T.save_tensors(directory / T.MODEL_NAME, state["model"])
            os._exit(3)
        return original(self, directory, state)
    T.Trainer._write_files = write_files
    from softmix.cli import main
    main(sys.argv[2:])
""")


def _train_args(out, precision):
    return ["train", "--data", "gmm", "--out", str(out), *TINY, *RUN, "--precision", precision]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(precision)``: the directory of an uninterrupted run (made once per module)."""
    runs = {}

    def get(precision):
        if precision not in runs:
            out = tmp_path_factory.mktemp(f"reference-{precision}")
            run(["-m", "softmix", *_train_args(out, precision)])
            runs[precision] = out
        return runs[precision]

    return get


def _assert_same_run(a, b):
    sa, sb = trainer_state(a), trainer_state(b)
    assert sa["step"] == sb["step"] == 30
    assert sa["losses"] == sb["losses"], "the resumed run's losses differ from the uninterrupted run's"
    for name in ("model", "ema"):
        wa, wb = load_trained(a, ema=name == "ema")[0].state_dict(), load_trained(b, ema=name == "ema")[0].state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} weights differ"
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    assert sa["scaler"] == sb["scaler"] and sa["lr_scheduler"] == sb["lr_scheduler"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_killed_run_resumes_to_the_same_trajectory(reference, tmp_path, precision):
    ref = reference(precision)
    out = tmp_path / "run"
    proc = run(["-c", KILLED, "15", "0", *_train_args(out, precision)], check=False)
    assert proc.returncode == -9, proc.stderr  # SIGKILL, after the checkpoint of step 10
    assert [s for s, _ in list_checkpoints(out)] == [10]
    assert len(trainer_state(out)["losses"]) == 10
    run(["-m", "softmix", *_train_args(out, precision), "--resume"])
    assert [s for s, _ in list_checkpoints(out)] == [10, 20, 30]
    _assert_same_run(out, ref)
    if precision == "fp16":  # the gradient scaler's state travelled with the checkpoint
        assert trainer_state(out)["scaler"]["scale"] > 0


def test_a_crash_while_writing_keeps_the_previous_checkpoint(reference, tmp_path):
    precision = "fp32"
    ref = reference(precision)
    out = tmp_path / "run"
    proc = run(["-c", TORN, "20", *_train_args(out, precision)], check=False)
    assert proc.returncode == 3, proc.stderr
    torn = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-000020.tmp-")]
    assert len(torn) == 1 and os.listdir(out / "checkpoints" / torn[0]) == ["model.safetensors"]
    # the previous checkpoint is whole, and it is what readers and --resume see
    assert [s for s, _ in list_checkpoints(out)] == [10]
    assert find_checkpoint(out) == out / "checkpoints" / "step-000010"
    assert json.loads((out / "config.json").read_text())["step"] == 10
    model = load_trained(out)[0]
    saved = load_trained(out / "checkpoints" / "step-000010")[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    run(["-m", "softmix", *_train_args(out, precision), "--resume"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000010", "step-000020", "step-000030"], "torn dir left"
    _assert_same_run(out, ref)


def test_keep_the_newest_checkpoints_and_skip_incomplete_ones(tmp_path, one_thread):
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(data="gmm", iters=20, **TINY_CONFIG))
    trainer.train(progress=False, out=out, save_every=5, keep=2)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000015", "step-000020"]
    assert trainer.last_checkpoint == out / "checkpoints" / "step-000020"
    # a checkpoint with a file missing or cut short is not complete: readers fall back
    newest = out / "checkpoints" / "step-000020"
    data = (newest / "ema.safetensors").read_bytes()
    (newest / "ema.safetensors").unlink()  # (in place would also cut the flat file: a hard link)
    (newest / "ema.safetensors").write_bytes(data[: len(data) // 2])
    assert find_checkpoint(out) == out / "checkpoints" / "step-000015"
    resumed = Trainer.resume(out)
    assert resumed.step == 15 and resumed.last_checkpoint == out / "checkpoints" / "step-000015"
    (out / "checkpoints" / "step-000015" / "trainer_state.pt").unlink()
    with pytest.raises(Exception, match="no complete checkpoint"):
        Trainer.resume(out)


def test_the_flat_files_follow_the_newest_checkpoint(tmp_path, one_thread):
    out = tmp_path / "run"
    Trainer(TrainConfig(data="gmm", iters=10, **TINY_CONFIG)).train(progress=False, out=out, save_every=5)
    newest = out / "checkpoints" / "step-000010"
    for name in ("config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt"):
        assert (out / name).read_bytes() == (newest / name).read_bytes(), name
    # a crash between replacing the flat files leaves them mixed; readers use the directory
    (out / "model.safetensors").write_bytes((out / "checkpoints" / "step-000005" / "model.safetensors").read_bytes())
    a = load_trained(out, ema=False)[0].state_dict()
    b = load_trained(newest, ema=False)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_does_not_overwrite_an_old_one(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--out", str(out), *TINY, "--iters", "5"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "gmm", "--out", str(out), *TINY, "--iters", "5"])
    assert exc.value.code == 2 and "already holds a training run; pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), *TINY, "--keep", "0"])
    assert "--keep" in capsys.readouterr().err


def test_a_training_state_that_does_not_fit_the_model_is_a_clear_error_and_the_weights_still_load(tmp_path):
    from softmix.checkpoint import CheckpointError, load_json, save_json

    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--out", str(out), *TINY, "--iters", "5"]) == 0
    ckpt = find_checkpoint(out)
    # an optimiser with one parameter fewer than the model, as a run saved by a softmix whose
    # model had other parameters
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    state["optimizer"]["param_groups"][0]["params"].pop()
    torch.save(state, ckpt / "trainer_state.pt")
    meta = load_json(ckpt / "config.json")
    meta["files"] = {name: (ckpt / name).stat().st_size for name in meta["files"]}
    save_json(ckpt / "config.json", meta)
    with pytest.raises(CheckpointError, match="training state does not fit this model's parameters .*cannot resume"):
        Trainer.resume(out, iters=10)
    model = load_trained(out)[0]  # sampling needs only the weights
    x_t, t = torch.randn(4, 2), torch.randint(0, 20, (4,))
    assert model(x_t, t).shape == (4, 2) and torch.isfinite(model(x_t, t)).all()
