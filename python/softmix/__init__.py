"""softmix: Soft Mixture Denoising (SMD, ICLR 2024) for any PyTorch diffusion model."""

from softmix import ops, reference
from softmix.categorical import CategoricalIdentifier
from softmix.diffusers_compat import register_with_diffusers
from softmix.ema import EMA
from softmix.head import ConvIdentifier, MLPIdentifier, SMDHead
from softmix.loss import training_loss
from softmix.sampling import sample
from softmix.schedule import NoiseSchedule
from softmix.wrap import SMD, find_injection_points

__version__ = "0.1.0"

register_with_diffusers()  # so that diffusers pipelines save and load SMD models; imports nothing

__all__ = [
    "ops",
    "reference",
    "NoiseSchedule",
    "SMD",
    "SMDHead",
    "ConvIdentifier",
    "MLPIdentifier",
    "CategoricalIdentifier",
    "find_injection_points",
    "training_loss",
    "sample",
    "EMA",
    "__version__",
]
