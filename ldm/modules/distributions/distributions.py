"""Import path of the original ``ldm.modules.distributions.distributions``."""

from ldm.model.vae import DiagonalGaussianDistribution

__all__ = ["DiagonalGaussianDistribution"]
