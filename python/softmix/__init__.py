"""softmix: Soft Mixture Denoising (SMD, ICLR 2024) for any PyTorch diffusion model."""

from softmix import ops, reference

__version__ = "0.1.0"

__all__ = ["ops", "reference", "__version__"]
