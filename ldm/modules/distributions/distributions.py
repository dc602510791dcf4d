"""Import path of the original ``ldm.modules.distributions.distributions``."""

from ldm.vae import DiagonalGaussianDistribution

__all__ = ["DiagonalGaussianDistribution"]
