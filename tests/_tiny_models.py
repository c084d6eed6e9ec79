"""Tiny denoisers shared by the library tests (fast on CPU)."""

import sys
import types

import pytest
import torch
from torch import nn


def tiny_unet2d(in_channels=1):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def tiny_unet2d_condition():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def import_denoising_diffusion_pytorch():
    """Import denoising-diffusion-pytorch, or skip.

    The package imports torchvision at the top, for its dataset and trainer only. PyPI's
    torchvision wheels are CUDA builds whose C ops do not load against a CPU-only torch, so
    where torchvision cannot be imported we stand in an empty module for it: the Unet and
    GaussianDiffusion do not touch it.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        stub.utils = types.ModuleType("torchvision.utils")
        sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms,
                            "torchvision.utils": stub.utils})
    try:
        import denoising_diffusion_pytorch
    except ImportError as err:
        pytest.skip(f"denoising-diffusion-pytorch is not importable here ({err}); "
                    "pip install --no-deps denoising-diffusion-pytorch einops ema-pytorch accelerate pytorch-fid")
    return denoising_diffusion_pytorch


class CountingMLP(nn.Module):
    """A vector denoiser that counts how often its backbone (everything but the last layer)
    runs, and on how many examples."""

    def __init__(self, features=2, hidden=32):
        super().__init__()
        self.inp = nn.Linear(features + 1, hidden)
        self.mid = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, features)
        self.backbone_calls = []
        self.mid.register_forward_hook(lambda m, a, o: self.backbone_calls.append(a[0].shape[0]))

    def forward(self, x, t):
        t = torch.as_tensor(t).float().reshape(-1, 1).expand(x.shape[0], 1) / 100
        return self.out(self.mid(self.inp(torch.cat([x, t], 1))))
