"""python -m softmix: help, train -> checkpoint, sample, compare, and clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from softmix.cli import main
from softmix.train import load_trained

TINY = ["--iters", "20", "--batch-size", "64", "--num-steps", "20", "--hidden", "32", "--layers", "1",
        "--latent-dim", "4", "--num-data", "512", "--no-progress"]


def _fails(argv, capsys, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "softmix", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "sample", "compare"):
        assert command in out


def test_train_writes_a_checkpoint_that_samples(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--out", str(out), *TINY]) == 0
    for name in ("config.json", "model.safetensors", "ema.safetensors", "trainer_state.pt"):
        assert (out / name).is_file()
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 20 and meta["config"]["smd"] is True
    model, schedule, cfg, shape = load_trained(out)
    assert type(model).__name__ == "SMD" and schedule.num_steps == 20 and shape == (2,)
    assert main(["sample", "--checkpoint", str(out), "--num", "64", "--steps", "5", "--out", str(tmp_path / "s.pt"),
                 "--no-progress"]) == 0
    x = torch.load(tmp_path / "s.pt")
    assert x.shape == (64, 2) and torch.isfinite(x).all()
    assert main(["sample", "--checkpoint", str(out), "--num", "64", "--steps", "5", "--method", "ddim",
                 "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    _fails(["sample", "--checkpoint", str(out), "--steps", "21", "--out", str(tmp_path / "x.pt")], capsys,
           "larger than the model's schedule")
    _fails(["sample", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pt")], capsys,
           "no checkpoint")


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_sample_uses_the_prediction_type_the_model_was_trained_with(tmp_path, prediction_type):
    import softmix

    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--prediction-type", prediction_type, "--out", str(out), *TINY]) == 0
    assert main(["sample", "--checkpoint", str(out), "--num", "64", "--steps", "5", "--seed", "3",
                 "--out", str(tmp_path / "s.pt"), "--no-progress"]) == 0
    model, schedule, cfg, _ = load_trained(out)
    g = torch.Generator().manual_seed(3)
    expected = softmix.sample(model, schedule, (64, 2), steps=5, generator=g, prediction_type=prediction_type,
                              progress=False)
    torch.testing.assert_close(torch.load(tmp_path / "s.pt"), expected)


def test_train_with_the_clean_bound_keeps_its_width_in_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--identifier", "categorical", "--num-components", "8",
                 "--prediction-type", "sample", "--bound", "clean", "--clean-width", "0.05", "--out", str(out),
                 *TINY]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["bound"] == "clean" and cfg["clean_width"] == 0.05
    _, _, loaded, _ = load_trained(out)
    assert loaded.clean_width == 0.05


def test_resume_continues_the_step_counter(tmp_path):
    out = tmp_path / "run"
    main(["train", "--data", "gmm-ring", "--plain", "--out", str(out), *TINY])
    args = [a if a != "20" or i != 1 else "30" for i, a in enumerate(TINY)]
    assert main(["train", "--data", "gmm-ring", "--plain", "--out", str(out), "--resume", *args]) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 30


def test_compare_writes_png_and_metrics(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", "gmm", "--out", str(out), "--sample-steps", "2,5", "--num", "200", *TINY]) == 0
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for name in ("plain", "SMD"):
        for steps in ("2", "5"):
            m = metrics[name][steps]
            assert 0 <= m["high_quality"] <= 1 and 0 <= m["modes_covered"] <= 49 and m["mmd"] >= 0
    assert "| SMD | 5 |" in (out / "metrics.md").read_text()


def test_compare_on_digits(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", "digits", "--out", str(out), "--sample-steps", "3", "--num", "16", *TINY]
    assert main(argv) == 0
    assert "mmd" in json.loads((out / "metrics.json").read_text())["metrics"]["SMD"]["3"]


def test_threads_sets_torch_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert main(["train", "--data", "gmm", "--plain", "--threads", "1", "--out", str(tmp_path / "run"), *TINY]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(3)
        assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--num", "8", "--steps", "2", "--threads", "2",
                     "--out", str(tmp_path / "s.pt"), "--no-progress"]) == 0
        assert torch.get_num_threads() == 2
        _fails(["compare", "--threads", "0", "--out", str(tmp_path / "c")], capsys, "expected a positive integer")
    finally:
        torch.set_num_threads(before)


def test_bad_arguments_give_clear_messages(tmp_path, capsys):
    out = str(tmp_path / "o")
    _fails(["train", "--data", "cifar", "--out", out], capsys, "unknown data 'cifar'")
    (tmp_path / "empty").mkdir()
    _fails(["train", "--data", str(tmp_path / "empty"), "--out", out], capsys, "holds no images")
    _fails(["train", "--iters", "0", "--out", out], capsys, "expected a positive integer")
    _fails(["train", "--bound", "clean", "--clean-width", "0", "--out", out], capsys, "expected a positive number")
    _fails(["train", "--schedule", "quadratic", "--out", out], capsys, "invalid choice")
    _fails(["train", "--out", out, "--inject", "nope", *TINY], capsys, "no module named 'nope'")
    _fails(["compare", "--num-steps", "10", "--sample-steps", "20", "--out", out], capsys, "larger than")
    _fails(["compare", "--sample-steps", "4,x", "--out", out], capsys, "comma-separated")
    _fails(["compare", "--final-width", "fit", "--out", out], capsys, "needs an SMD model with --identifier categorical")
    _fails(["train", "--resume", "--out", out], capsys, "--resume")
    _fails(["sample", "--checkpoint", out, "--out", str(tmp_path / "x.gif")], capsys, ".png, .pt or .npy")
    _fails([], capsys, "required")


def test_final_width_fit_in_compare_and_sample(tmp_path, capsys):
    from softmix.loss import fit_final_width

    out = tmp_path / "cmp"
    cat = ["--identifier", "categorical", "--num-components", "6", "--prediction-type", "sample"]
    assert main(["compare", "--data", "gmm", "--out", str(out), "--sample-steps", "2,5", "--num", "200",
                 "--final-width", "fit", *cat, *TINY]) == 0
    widths = json.loads((out / "metrics.json").read_text())["smd_final_width"]
    assert set(widths) == {"2", "5"} and all(0 < w < 10 for w in widths.values())
    model, schedule, cfg, shape = load_trained(out / "smd")
    data = torch.randn(64, 2)
    assert fit_final_width(model, schedule, data, steps=5, prediction_type="sample") > 0

    assert main(["sample", "--checkpoint", str(out / "smd"), "--num", "64", "--steps", "5", "--final-width", "fit",
                 "--out", str(tmp_path / "s.pt"), "--no-progress"]) == 0
    assert "fitted final width" in capsys.readouterr().out
    # a number: the samples around the same chain's estimates, at that width
    argv = ["sample", "--checkpoint", str(out / "smd"), "--num", "4000", "--steps", "5", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a.pt")]) == 0
    assert main([*argv, "--final-width", "0.5", "--out", str(tmp_path / "b.pt")]) == 0
    offset = torch.load(tmp_path / "b.pt") - torch.load(tmp_path / "a.pt")
    assert abs(offset.std().item() / 0.5 - 1) < 0.05

    _fails([*argv, "--final-width", "-1", "--out", str(tmp_path / "c.pt")], capsys, "'fit' or a finite number >= 0")
    _fails([*argv, "--final-width", "nan", "--out", str(tmp_path / "c.pt")], capsys, "'fit' or a finite number >= 0")
    _fails(["sample", "--checkpoint", str(out / "plain"), "--num", "4", "--steps", "5", "--final-width", "0.1",
            "--out", str(tmp_path / "c.pt"), "--no-progress"], capsys, "applies to SMD models")
    gauss = tmp_path / "gauss"
    assert main(["train", "--data", "gmm", "--out", str(gauss), *TINY]) == 0
    _fails(["sample", "--checkpoint", str(gauss), "--num", "4", "--steps", "5", "--final-width", "fit",
            "--out", str(tmp_path / "c.pt"), "--no-progress"], capsys, "needs an SMD model with --identifier categorical")
