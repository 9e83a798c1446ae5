"""sd_lightning: latent diffusion training with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
