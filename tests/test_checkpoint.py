"""save_pretrained / from_pretrained round trips, clear errors, atomic writes, EMA."""

import json
import os

import pytest
import torch
from torch import nn

import softmix
from softmix import EMA, SMD, NoiseSchedule
from softmix.checkpoint import CheckpointError, save_json
from softmix.nets import MLPDenoiser

from _tiny_models import tiny_unet2d


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _samples(model, shape):
    return softmix.sample(model, NoiseSchedule(10), shape, steps=4, generator=torch.Generator().manual_seed(0),
                          progress=False)


def test_round_trip_with_a_fresh_denoiser(tmp_path):
    model = _perturbed(SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4, inject="output"))
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["model.safetensors", "smd_config.json"]
    loaded = SMD.from_pretrained(tmp_path / "ckpt", denoiser=MLPDenoiser(2, hidden=16, layers=1))
    assert loaded.injection_points == model.injection_points
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_samples(model, (16, 2)), _samples(loaded, (16, 2)))


def test_diffusers_model_reloads_without_a_denoiser(tmp_path):
    model = _perturbed(SMD(tiny_unet2d(), latent_dim=4))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "smd_config.json").read_text())
    assert config["denoiser"]["class"] == "UNet2DModel"
    loaded = SMD.from_pretrained(tmp_path)
    assert type(loaded.denoiser).__name__ == "UNet2DModel"
    assert torch.equal(_samples(model, (2, 1, 8, 8)), _samples(loaded, (2, 1, 8, 8)))


def test_missing_and_truncated_files_give_clear_errors(tmp_path):
    model = SMD(MLPDenoiser(2, hidden=16, layers=1), latent_dim=4)
    with pytest.raises(CheckpointError, match="not a directory"):
        SMD.from_pretrained(tmp_path / "nothing", denoiser=MLPDenoiser(2, hidden=16, layers=1))
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        SMD.from_pretrained(tmp_path)  # a custom denoiser must be passed
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SMD.from_pretrained(tmp_path, denoiser=MLPDenoiser(2, hidden=16, layers=1))
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        SMD.from_pretrained(tmp_path, denoiser=MLPDenoiser(2, hidden=16, layers=1))
    cfg = tmp_path / "smd_config.json"
    cfg.write_text(cfg.read_text()[:20])
    with pytest.raises(CheckpointError, match="smd_config.json is truncated"):
        SMD.from_pretrained(tmp_path, denoiser=MLPDenoiser(2, hidden=16, layers=1))
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="do not match"):
        SMD.from_pretrained(tmp_path, denoiser=MLPDenoiser(2, hidden=32, layers=1))


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "meta.json"
    save_json(path, {"step": 1})
    with pytest.raises(TypeError):
        save_json(path, {"step": 2, "bad": object()})  # fails midway through json.dump
    assert json.loads(path.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["meta.json"], "no temporary file is left behind"


def test_ema_follows_the_formula():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * start + 0.1 * model.weight)
    with ema.average_parameters(model):
        torch.testing.assert_close(model.weight, 0.9 * start + 0.1 * (start + 1))
    torch.testing.assert_close(model.weight, start + 1)  # restored
    warm = EMA(model, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"]) and other.decay == 0.9


@pytest.mark.parametrize("imports", ["diffusers, softmix", "softmix, diffusers"])
def test_a_diffusers_pipeline_saves_and_reloads_its_smd_unet(tmp_path, imports):
    # Without softmix listed in diffusers' loadable classes, save_pretrained skips the UNet
    # with a warning. The reload runs in a fresh process, importing softmix first as diffusers
    # asks (it imports no library just because model_index.json names it).
    import subprocess
    import sys

    import diffusers

    model = _perturbed(SMD(tiny_unet2d(), latent_dim=8))
    pipe = diffusers.DDIMPipeline(unet=model, scheduler=diffusers.DDIMScheduler(num_train_timesteps=20))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == ["softmix", "SMD"]

    def images(p):
        p.set_progress_bar_config(disable=True)
        return p(batch_size=2, num_inference_steps=4, eta=0.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    torch.manual_seed(5)  # eta of the SMD head comes from the global generator
    expected = images(pipe)
    script = (
        f"import sys, numpy, torch, {imports}\n"
        "pipe = diffusers.DDIMPipeline.from_pretrained(sys.argv[1])\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "torch.manual_seed(5)\n"
        "out = pipe(batch_size=2, num_inference_steps=4, eta=0.0, output_type='np',\n"
        "           generator=torch.Generator().manual_seed(0)).images\n"
        "print(type(pipe.unet).__module__, type(pipe.unet).__name__)\n"
        "numpy.save(sys.argv[2], out)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "softmix.wrap SMD" in done.stdout
    import numpy as np

    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
