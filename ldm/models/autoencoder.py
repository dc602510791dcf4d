"""Import path of the original yamls' ``target: ldm.models.autoencoder.AutoencoderKL``."""

from ldm.vae import AutoencoderKL

__all__ = ["AutoencoderKL"]
