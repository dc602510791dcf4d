"""Fast, inference-only latent diffusion (Stable Diffusion 2.x) on native PyTorch attention."""

__version__ = "0.1.0"
